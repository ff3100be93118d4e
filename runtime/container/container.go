package container

import (
	"context"
	"encoding/json"
	"fmt"
	"sync"
	"sync/atomic"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
	"github.com/kiln-runtime/kiln/runtime/stdio"
)

// Container is one container in the sandbox.
type Container struct {
	id   string
	m    *Manager
	init *Process
	sm   stateMachine
	ooms atomic.Uint64

	mu    sync.Mutex
	execs map[string]*Process
}

// ID is the container's id.
func (c *Container) ID() string { return c.id }

// State is the container's lifecycle state as the host knows it.
func (c *Container) State() State { return c.sm.get() }

// Init is the container's init process.
func (c *Container) Init() *Process { return c.init }

// OOMKills counts the OOM events the guest reported for this container.
func (c *Container) OOMKills() uint64 { return c.ooms.Load() }

// Start runs the container's init process.
func (c *Container) Start(ctx context.Context) error {
	if err := c.sm.require("start", Created); err != nil {
		return fmt.Errorf("start container %s: %w", c.id, err)
	}
	err := c.m.request(ctx, func(ctx context.Context) error {
		_, err := c.m.api.StartContainer(ctx, &agentv1.StartContainerRequest{ContainerId: c.id})
		return err
	})
	if err != nil {
		return fmt.Errorf("start container %s: %w", c.id, err)
	}
	// A process that exits at once may already have moved the container to stopped.
	c.sm.advance(Created, Running)
	return nil
}

// Wait waits for the init process's exit and its output; see Process.Wait.
func (c *Container) Wait(ctx context.Context) (Exit, error) { return c.init.Wait(ctx) }

// Exec starts an additional process in the running container. execID must be unique among the container's live
// processes.
func (c *Container) Exec(ctx context.Context, execID string, proc *specs.Process, io stdio.IO) (*Process, error) {
	if execID == "" {
		return nil, fmt.Errorf("exec in container %s: empty exec id", c.id)
	}
	if err := c.sm.require("exec in", Running); err != nil {
		return nil, fmt.Errorf("exec %s in container %s: %w", execID, c.id, err)
	}
	if proc == nil {
		return nil, fmt.Errorf("exec %s in container %s: no process", execID, c.id)
	}
	io.Terminal = proc.Terminal
	raw, err := json.Marshal(proc)
	if err != nil {
		return nil, fmt.Errorf("exec %s in container %s: encode process: %w", execID, c.id, err)
	}
	p, err := c.m.startProcess(ctx, c, execID, io, func(rctx context.Context, sp *agentv1.Stdio) (uint32, error) {
		resp, err := c.m.api.ExecProcess(rctx, &agentv1.ExecProcessRequest{
			ContainerId: c.id, ExecId: execID, Process: raw, Stdio: sp,
		})
		return resp.GetPid(), err
	})
	if err != nil {
		return nil, fmt.Errorf("exec %s in container %s: %w", execID, c.id, err)
	}
	c.mu.Lock()
	c.execs[execID] = p
	c.mu.Unlock()
	return p, nil
}

// Process returns the init process for an empty execID, else the exec process of that id.
func (c *Container) Process(execID string) (*Process, error) {
	if execID == "" {
		return c.init, nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	p, ok := c.execs[execID]
	if !ok {
		return nil, fmt.Errorf("process %s of container %s: %w", execID, c.id, ErrNotFound)
	}
	return p, nil
}

// DeleteProcess forgets an exec process that has exited and closes its streams, so its exec id can be used
// again.
func (c *Container) DeleteProcess(ctx context.Context, execID string) (Exit, error) {
	p, err := c.Process(execID)
	if err != nil {
		return Exit{}, err
	}
	if execID == "" {
		return Exit{}, fmt.Errorf("delete process of container %s: the init process goes with Delete", c.id)
	}
	select {
	case <-p.exit.done:
	default:
		return Exit{}, fmt.Errorf("delete process %s of container %s: %w: still running", execID, c.id, ErrInvalidState)
	}
	c.mu.Lock()
	delete(c.execs, execID)
	c.mu.Unlock()
	c.m.unregister(exitKey{c.id, execID})
	_ = p.streams.Close()
	return p.exit.exit, p.exit.err
}

// Kill signals the init process, or with all every process of the container.
func (c *Container) Kill(ctx context.Context, signal uint32, all bool) error {
	err := c.m.request(ctx, func(ctx context.Context) error {
		_, err := c.m.api.SignalProcess(ctx, &agentv1.SignalProcessRequest{ContainerId: c.id, Signal: signal, All: all})
		return err
	})
	if err != nil {
		return fmt.Errorf("signal %d to container %s (all=%t): %w", signal, c.id, all, err)
	}
	return nil
}

// Pause freezes every process of the container.
func (c *Container) Pause(ctx context.Context) error {
	if err := c.sm.require("pause", Running); err != nil {
		return fmt.Errorf("pause container %s: %w", c.id, err)
	}
	err := c.m.request(ctx, func(ctx context.Context) error {
		_, err := c.m.api.PauseContainer(ctx, &agentv1.PauseContainerRequest{ContainerId: c.id})
		return err
	})
	if err != nil {
		return fmt.Errorf("pause container %s: %w", c.id, err)
	}
	c.sm.advance(Running, Paused)
	return nil
}

// Resume thaws a paused container.
func (c *Container) Resume(ctx context.Context) error {
	if err := c.sm.require("resume", Paused); err != nil {
		return fmt.Errorf("resume container %s: %w", c.id, err)
	}
	err := c.m.request(ctx, func(ctx context.Context) error {
		_, err := c.m.api.ResumeContainer(ctx, &agentv1.ResumeContainerRequest{ContainerId: c.id})
		return err
	})
	if err != nil {
		return fmt.Errorf("resume container %s: %w", c.id, err)
	}
	c.sm.advance(Paused, Running)
	return nil
}

// Update applies new cgroup resources.
func (c *Container) Update(ctx context.Context, res *specs.LinuxResources) error {
	if err := c.sm.require("update", Created, Running, Paused); err != nil {
		return fmt.Errorf("update container %s: %w", c.id, err)
	}
	raw, err := json.Marshal(res)
	if err != nil {
		return fmt.Errorf("update container %s: encode resources: %w", c.id, err)
	}
	err = c.m.request(ctx, func(ctx context.Context) error {
		_, err := c.m.api.UpdateContainer(ctx, &agentv1.UpdateContainerRequest{ContainerId: c.id, Resources: raw})
		return err
	})
	if err != nil {
		return fmt.Errorf("update container %s: %w", c.id, err)
	}
	return nil
}

// Stats returns the container's cgroup v2 figures.
func (c *Container) Stats(ctx context.Context) (*agentv1.StatsContainerResponse, error) {
	var resp *agentv1.StatsContainerResponse
	err := c.m.request(ctx, func(ctx context.Context) error {
		var err error
		resp, err = c.m.api.StatsContainer(ctx, &agentv1.StatsContainerRequest{ContainerId: c.id})
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("stats of container %s: %w", c.id, err)
	}
	return resp, nil
}

// Pids lists the container's processes (guest pids; exec id where the process was started through Exec).
func (c *Container) Pids(ctx context.Context) ([]*agentv1.ProcessInfo, error) {
	var resp *agentv1.ListProcessesResponse
	err := c.m.request(ctx, func(ctx context.Context) error {
		var err error
		resp, err = c.m.api.ListProcesses(ctx, &agentv1.ListProcessesRequest{ContainerId: c.id})
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("list processes of container %s: %w", c.id, err)
	}
	return resp.GetProcesses(), nil
}

// Delete removes the container from the guest. Without force it must be created or stopped; with force a
// running container is killed first. Its processes' streams are closed and pending waits fail.
func (c *Container) Delete(ctx context.Context, force bool) error {
	if !force {
		if err := c.sm.require("delete", Created, Stopped); err != nil {
			return fmt.Errorf("delete container %s: %w", c.id, err)
		}
	}
	if c.sm.get() == Deleted {
		return nil
	}
	err := c.m.request(ctx, func(ctx context.Context) error {
		_, err := c.m.api.RemoveContainer(ctx, &agentv1.RemoveContainerRequest{ContainerId: c.id, Force: force})
		return err
	})
	if err != nil {
		return fmt.Errorf("delete container %s: %w", c.id, err)
	}
	c.sm.mu.Lock()
	c.sm.state = Deleted
	c.sm.mu.Unlock()
	deleted := fmt.Errorf("container %s: %w", c.id, ErrDeleted)
	for _, p := range c.processes() {
		p.exit.complete(Exit{}, deleted)
		c.m.unregister(exitKey{c.id, p.execID})
	}
	c.closeStreams()
	c.m.forget(c.id)
	return nil
}

// processExited moves the container to stopped when its init exits.
func (c *Container) processExited() {
	c.sm.mu.Lock()
	defer c.sm.mu.Unlock()
	if allowed(c.sm.state, Stopped) {
		c.sm.state = Stopped
	}
}

func (c *Container) processes() []*Process {
	c.mu.Lock()
	defer c.mu.Unlock()
	ps := make([]*Process, 0, len(c.execs)+1)
	if c.init != nil {
		ps = append(ps, c.init)
	}
	for _, p := range c.execs {
		ps = append(ps, p)
	}
	return ps
}

func (c *Container) closeStreams() {
	for _, p := range c.processes() {
		_ = p.streams.Close()
	}
}
