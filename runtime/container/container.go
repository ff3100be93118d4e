package container

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"sync"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/sirupsen/logrus"

	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
	"github.com/kiln-runtime/kiln/proto/lifecycle"
	"github.com/kiln-runtime/kiln/rlimit"
	"github.com/kiln-runtime/kiln/runtime/stdio"
)

// Container is one container in the pod. Its state is its init process's.
type Container struct {
	id      string
	bundle  string
	hostPid uint32
	m       *Manager
	init    *Process

	// deleteMu makes Deletes of the container one at a time: a second (CRI's exit handler and its waiter both
	// delete) finds it deleted.
	deleteMu sync.Mutex

	mu    sync.Mutex
	execs map[string]*Process
}

// ID is the container's id.
func (c *Container) ID() string { return c.id }

// Bundle is the bundle directory given at Create.
func (c *Container) Bundle() string { return c.bundle }

// HostPid is the container's pid on the host (CreateOptions.HostPid), which containerd gets for each of its
// processes.
func (c *Container) HostPid() uint32 { return c.hostPid }

// State is the container's lifecycle state as the host knows it.
func (c *Container) State() lifecycle.State { return c.init.State() }

// Init is the container's init process.
func (c *Container) Init() *Process { return c.init }

// Start runs the container's init process; see Process.Start.
func (c *Container) Start(ctx context.Context) error { return c.init.Start(ctx, nil) }

// Wait waits for the init process's exit and its output; see Process.Wait.
func (c *Container) Wait(ctx context.Context) (Exit, error) { return c.init.Wait(ctx) }

// AddExec registers an exec process in the running container; Start runs it. execID must not name a process
// the container still holds (delete a finished one first).
func (c *Container) AddExec(execID string, proc *specs.Process, io stdio.IO, release io.Closer) (*Process, error) {
	if execID == "" {
		return nil, fmt.Errorf("exec in container %s: %w: empty exec id", c.id, ErrInvalidArgument)
	}
	if proc == nil {
		return nil, fmt.Errorf("exec %s in container %s: %w: no process", execID, c.id, ErrInvalidArgument)
	}
	if err := c.init.require("exec in", lifecycle.Running); err != nil {
		return nil, fmt.Errorf("exec %s: %w", execID, err)
	}
	io.Terminal = proc.Terminal
	raw, err := json.Marshal(rlimit.Fill(proc, c.m.opts.Rlimits))
	if err != nil {
		return nil, fmt.Errorf("exec %s in container %s: encode process: %w", execID, c.id, err)
	}
	p := newProcess(c, execID, lifecycle.Exec(), io, release)
	p.spec = raw
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.execs[execID]; ok {
		return nil, fmt.Errorf("exec %s in container %s: %w", execID, c.id, ErrAlreadyExists)
	}
	c.execs[execID] = p
	return p, nil
}

// Exec adds an exec process and starts it.
func (c *Container) Exec(ctx context.Context, execID string, proc *specs.Process, io stdio.IO) (*Process, error) {
	p, err := c.AddExec(execID, proc, io, nil)
	if err != nil {
		return nil, err
	}
	if err := p.Start(ctx, nil); err != nil {
		_, _ = c.DeleteProcess(ctx, execID)
		return nil, err
	}
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

// DeleteProcess forgets an exec process that has exited or never started, so its exec id can be used again,
// and returns how it ended (a process deleted before it ran counts as killed).
func (c *Container) DeleteProcess(ctx context.Context, execID string) (Exit, error) {
	if execID == "" {
		return Exit{}, fmt.Errorf("delete process of container %s: the init process goes with Delete", c.id)
	}
	p, err := c.Process(execID)
	if err != nil {
		return Exit{}, err
	}
	exited, err := p.claimForDelete()
	if err != nil {
		return Exit{}, err
	}
	if exited {
		// The exit is known; wait for its output before the streams go.
		if _, err := p.Wait(ctx); err != nil && ctx.Err() != nil {
			return Exit{}, err
		}
	}
	c.mu.Lock()
	if c.execs[execID] == p {
		delete(c.execs, execID)
	}
	c.mu.Unlock()
	return p.remove()
}

// deleteDrainTimeout bounds how long Delete waits for the output of the container's processes that have exited:
// what is left then is cut off, as runc's shim does after the same 10 s.
const deleteDrainTimeout = 10 * time.Second

// awaitDelivery waits, within deleteDrainTimeout, for every process of the container that has exited to deliver its
// output and report its exit, so that a Delete right after an exit (a client that saw the task stopped) neither
// cuts the output off nor has its TaskDelete published before the TaskExit.
func (c *Container) awaitDelivery(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, deleteDrainTimeout)
	defer cancel()
	c.mu.Lock()
	procs := []*Process{c.init}
	for _, p := range c.execs {
		procs = append(procs, p)
	}
	c.mu.Unlock()
	for _, p := range procs {
		if p.State() != lifecycle.Stopped {
			continue
		}
		if _, err := p.Wait(ctx); err != nil && ctx.Err() != nil {
			c.m.log.WithError(err).WithField("container", c.id).Warn("output still undelivered at the container's delete; cutting it off")
			return
		}
	}
}

// endExecs ends the container's execs that still run once its init has exited, and waits (within the manager's
// DrainTimeout) for their exits to be reported, so that the init's exit is the container's last, as runc's shim
// reports them: in a container that shares a PID namespace they would run on, and CRI takes the init's exit for
// the container's end (and deletes it).
func (c *Container) endExecs(log *logrus.Entry) {
	ctx, cancel := context.WithTimeout(c.m.ctx, c.m.opts.DrainTimeout)
	defer cancel()
	c.mu.Lock()
	var running []*Process
	var starting []chan struct{}
	for _, e := range c.execs {
		e.mu.Lock()
		if e.delivering {
			running = append(running, e)
		} else if e.starting != nil {
			starting = append(starting, e.starting)
		}
		e.mu.Unlock()
	}
	c.mu.Unlock()
	if len(starting) > 0 {
		// Starts whose request was out as the init exited (Start refuses those that come after): once they are
		// settled, the execs they started are among those that end.
		for _, gate := range starting {
			select {
			case <-gate:
			case <-ctx.Done():
			}
		}
		c.mu.Lock()
		running = running[:0]
		for _, e := range c.execs {
			e.mu.Lock()
			if e.delivering {
				running = append(running, e)
			}
			e.mu.Unlock()
		}
		c.mu.Unlock()
	}
	live := false
	for _, e := range running {
		select {
		case <-e.done:
		default:
			// Still running, or exited with a child that holds its output (in a PID namespace the init shares).
			live = true
		}
	}
	if len(running) == 0 {
		return
	}
	if live && c.m.guestLost() == nil {
		if err := c.Kill(ctx, sigKill, true); err != nil {
			log.WithError(err).Warn("end the execs that outlive the container's init")
		}
	}
	for _, e := range running {
		if _, err := e.Wait(ctx); err != nil && ctx.Err() != nil {
			log.WithError(err).Warn("the init's exit is reported before its execs' exits")
			return
		}
	}
}

// Kill signals the init process, or with all every process of the container.
func (c *Container) Kill(ctx context.Context, signal uint32, all bool) error {
	r := &agentv1.SignalProcessRequest{ContainerId: c.id, Signal: signal, All: all}
	if signal == sigKill {
		gaveUp, err := c.m.mustAnswer(ctx, "SIGKILL to container "+c.id, func(ctx context.Context) error {
			_, err := c.m.api.SignalProcess(ctx, r)
			if err == nil {
				// Here, so that a SIGKILL delivered after its caller stopped waiting is followed too.
				c.m.watchKill(c.init)
			}
			return err
		})
		if err == nil || gaveUp {
			return nil
		}
		return fmt.Errorf("signal %d to container %s (all=%t): %w", signal, c.id, all, fromGuest(err))
	}
	_, err := c.m.api.SignalProcess(ctx, r)
	if err != nil {
		// NotFound, as runc's: the process finished, and the host has not heard of its exit yet.
		return fmt.Errorf("signal %d to container %s (all=%t): %w", signal, c.id, all, fromGuest(err))
	}
	return nil
}

// Pause freezes every process of the container.
func (c *Container) Pause(ctx context.Context) error {
	if err := c.init.require("pause", lifecycle.Running); err != nil {
		return err
	}
	if _, err := c.m.api.PauseContainer(ctx, &agentv1.PauseContainerRequest{ContainerId: c.id}); err != nil {
		return fmt.Errorf("pause container %s: %w", c.id, fromGuest(err))
	}
	return c.init.transition(lifecycle.Paused)
}

// Resume thaws a paused container.
func (c *Container) Resume(ctx context.Context) error {
	if err := c.init.require("resume", lifecycle.Paused); err != nil {
		return err
	}
	if _, err := c.m.api.ResumeContainer(ctx, &agentv1.ResumeContainerRequest{ContainerId: c.id}); err != nil {
		return fmt.Errorf("resume container %s: %w", c.id, fromGuest(err))
	}
	return c.init.transition(lifecycle.Running)
}

// Update applies new cgroup resources.
func (c *Container) Update(ctx context.Context, res *specs.LinuxResources) error {
	if err := c.init.require("update", lifecycle.Created, lifecycle.Running, lifecycle.Paused); err != nil {
		return err
	}
	raw, err := json.Marshal(res)
	if err != nil {
		return fmt.Errorf("update container %s: encode resources: %w", c.id, err)
	}
	if _, err := c.m.api.UpdateContainer(ctx, &agentv1.UpdateContainerRequest{ContainerId: c.id, Resources: raw}); err != nil {
		// NotFound: CRI takes the update of a container that is gone for done, as with runc.
		return fmt.Errorf("update container %s: %w", c.id, fromGuest(err))
	}
	return nil
}

// Stats returns the container's cgroup v2 figures.
func (c *Container) Stats(ctx context.Context) (*agentv1.StatsContainerResponse, error) {
	resp, err := c.m.api.StatsContainer(ctx, &agentv1.StatsContainerRequest{ContainerId: c.id})
	if err != nil {
		return nil, fmt.Errorf("stats of container %s: %w", c.id, fromGuest(err))
	}
	if n := len(resp.GetIo().GetUsage()); n > maxIODevices {
		return nil, fmt.Errorf("stats of container %s: the guest reports %d block devices, more than %d", c.id, n, maxIODevices)
	}
	return resp, nil
}

// Bounds on the lists a guest answers with, which the host copies into containerd's replies (a 4 MiB ttrpc
// message of empty entries decodes into millions of them): far beyond what a guest of Kiln's has.
const (
	maxIODevices = 1024
	maxProcesses = 1 << 16
)

// Pids lists the container's processes (guest pids; exec id where the process was started through Exec). An
// exec id the guest names that this container does not hold is left out: it is the guest's word only.
func (c *Container) Pids(ctx context.Context) ([]*agentv1.ProcessInfo, error) {
	resp, err := c.m.api.ListProcesses(ctx, &agentv1.ListProcessesRequest{ContainerId: c.id})
	if err != nil {
		return nil, fmt.Errorf("list processes of container %s: %w", c.id, fromGuest(err))
	}
	procs := resp.GetProcesses()
	if len(procs) > maxProcesses {
		return nil, fmt.Errorf("list processes of container %s: the guest lists %d processes, more than %d", c.id, len(procs), maxProcesses)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, p := range procs {
		if p.GetExecId() != "" && c.execs[p.GetExecId()] == nil {
			p.ExecId = ""
		}
	}
	return procs, nil
}

// Delete removes the container from the guest and returns how its init process ended (a container deleted
// before its exit was seen counts as killed). Without force it must be created or stopped; with force a running
// container is killed first. Pending waits of its processes end with ErrDeleted.
func (c *Container) Delete(ctx context.Context, force bool) (Exit, error) {
	c.deleteMu.Lock()
	defer c.deleteMu.Unlock()
	if c.init.State() == lifecycle.Deleted {
		// Deleted by another Delete meanwhile, which reported it: this one would report it twice.
		return Exit{}, fmt.Errorf("delete container %s: %w: deleted already", c.id, ErrNotFound)
	}
	if !force {
		if err := c.init.require("delete", lifecycle.Created, lifecycle.Stopped); err != nil {
			return Exit{}, err
		}
	}
	c.awaitDelivery(ctx)
	// With the guest gone there is nothing to remove there; the host's handles still go.
	if c.m.guestLost() == nil {
		gaveUp, err := c.m.mustAnswer(ctx, "the removal of container "+c.id, func(ctx context.Context) error {
			_, err := c.m.api.RemoveContainer(ctx, &agentv1.RemoveContainerRequest{ContainerId: c.id, Force: force})
			return err
		})
		if notInGuest(err) {
			// Removed already: a removal the guest carried out after its caller stopped waiting. The host's side
			// still has to go, or the task would outlive its Delete.
			c.m.log.WithError(err).Warn("the guest had removed container " + c.id)
			err = nil
		}
		if err != nil && !gaveUp {
			return Exit{}, fmt.Errorf("delete container %s: %w", c.id, err)
		}
	}
	c.mu.Lock()
	execs := make([]*Process, 0, len(c.execs))
	for _, p := range c.execs {
		execs = append(execs, p)
	}
	c.execs = map[string]*Process{}
	c.mu.Unlock()
	for _, p := range execs {
		if _, err := p.remove(); err != nil {
			c.m.log.WithError(err).Warn("delete exec process with its container")
		}
	}
	e, err := c.init.remove()
	c.m.forget(c.id)
	return e, err
}
