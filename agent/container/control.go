package container

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/opencontainers/cgroups"
	"github.com/opencontainers/runc/libcontainer"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
	"github.com/kiln-runtime/kiln/proto/lifecycle"
)

// startedProcess finds a process that has been started (it has a pid and
// stdio); an exec still being set up is not.
func (c *container) startedProcess(execID string) (*process, lifecycle.State, error) {
	p, err := c.process(execID)
	if err != nil {
		return nil, 0, err
	}
	c.mu.Lock()
	st, started := p.sm.State(), p.io != nil && p.pid != 0
	c.mu.Unlock()
	if !started {
		return nil, st, status.Errorf(codes.FailedPrecondition, "exec %q of container %s is not started", execID, c.id)
	}
	return p, st, nil
}

// SignalProcess signals one process, or every process of the container.
func (s *Service) SignalProcess(ctx context.Context, req *agentv1.SignalProcessRequest) (*agentv1.SignalProcessResponse, error) {
	c, err := s.get(req.GetContainerId())
	if err != nil {
		return nil, err
	}
	sig := unix.Signal(req.GetSignal())
	if req.GetAll() {
		if err := c.signalAll(sig); err != nil {
			return nil, err
		}
		return &agentv1.SignalProcessResponse{}, nil
	}
	p, st, err := c.startedProcess(req.GetExecId())
	if err != nil {
		return nil, err
	}
	if st == lifecycle.Stopped || st == lifecycle.Deleted {
		return nil, status.Errorf(codes.NotFound, "signal %s of container %s: process already finished", processName(p), c.id)
	}
	if p.execID == "" {
		// The container's Signal kills every process when the container
		// shares the guest's pid namespace, and thaws a paused one for
		// SIGKILL.
		err = c.lc.Signal(sig)
	} else {
		err = p.lp.Signal(sig)
	}
	if errors.Is(err, libcontainer.ErrNotRunning) || errors.Is(err, os.ErrProcessDone) || errors.Is(err, unix.ESRCH) {
		// It exited and was reaped, but its output is still being drained, so its state is not Stopped yet: the
		// host's Kill raced its exit, which is not a failure of the kill (runc answers NotFound too).
		return nil, status.Errorf(codes.NotFound, "signal %s of container %s: process already finished", processName(p), c.id)
	}
	if err != nil {
		return nil, fmt.Errorf("signal %s of container %s with %d: %w", processName(p), c.id, sig, err)
	}
	return &agentv1.SignalProcessResponse{}, nil
}

func processName(p *process) string {
	if p.execID == "" {
		return "init"
	}
	return "exec " + p.execID
}

func (c *container) signalAll(sig unix.Signal) error {
	if sig == unix.SIGKILL && c.cgroupDir != "" {
		// cgroup.kill reaches processes forked while the list is walked.
		if err := cgroups.WriteFile(c.cgroupDir, "cgroup.kill", "1"); err == nil {
			return nil
		}
	}
	pids, err := c.lc.Processes()
	if err != nil {
		return fmt.Errorf("list processes of container %s: %w", c.id, err)
	}
	for _, pid := range pids {
		if err := unix.Kill(pid, sig); err != nil && !errors.Is(err, unix.ESRCH) {
			return fmt.Errorf("signal pid %d of container %s with %d: %w", pid, c.id, sig, err)
		}
	}
	return nil
}

// WaitProcess answers once the process has exited and its output is
// delivered.
func (s *Service) WaitProcess(ctx context.Context, req *agentv1.WaitProcessRequest) (*agentv1.WaitProcessResponse, error) {
	c, err := s.get(req.GetContainerId())
	if err != nil {
		return nil, err
	}
	p, _, err := c.startedProcess(req.GetExecId())
	if err != nil {
		return nil, err
	}
	select {
	case <-p.done:
	case <-ctx.Done():
		return nil, status.FromContextError(ctx.Err()).Err()
	}
	return &agentv1.WaitProcessResponse{ExitStatus: p.exitStatus, ExitedAt: timestamppb.New(p.exitedAt)}, nil
}

// RemoveContainer destroys a stopped (or never started) container; force
// kills a running or paused one first.
func (s *Service) RemoveContainer(ctx context.Context, req *agentv1.RemoveContainerRequest) (*agentv1.RemoveContainerResponse, error) {
	c, err := s.get(req.GetContainerId())
	if err != nil {
		return nil, err
	}
	c.mu.Lock()
	st := c.init.sm.State()
	c.mu.Unlock()
	if st != lifecycle.Stopped {
		if !req.GetForce() && st != lifecycle.Created {
			return nil, transitionErr("remove container", c.id, &lifecycle.TransitionError{From: st, To: lifecycle.Deleted})
		}
		if err := c.lc.Signal(unix.SIGKILL); err != nil {
			s.log.WithError(err).WithField("container", c.id).Debug("kill container init")
		}
		if err := c.signalAll(unix.SIGKILL); err != nil {
			s.log.WithError(err).WithField("container", c.id).Debug("kill container processes")
		}
	}
	if err := c.waitAll(ctx, removeKillTimeout); err != nil {
		return nil, err
	}
	c.mu.Lock()
	if c.init.sm.State() == lifecycle.Deleted {
		c.mu.Unlock()
		// Another removal of it finished meanwhile (the host's retry of one it stopped waiting for): gone, as for
		// any removal that finds the container no more.
		return nil, status.Errorf(codes.NotFound, "container %s: removed already", c.id)
	}
	if err := c.init.sm.Transition(lifecycle.Deleted); err != nil {
		c.mu.Unlock()
		return nil, transitionErr("remove container", c.id, err)
	}
	c.mu.Unlock()
	if c.oom != nil {
		c.oom.close()
	}
	if err := c.lc.Destroy(); err != nil {
		s.log.WithError(err).WithField("container", c.id).Warn("destroy container")
	}
	if c.readOnly != nil {
		if err := c.readOnly.remove(); err != nil {
			s.log.WithError(err).WithField("container", c.id).Warn("remove read-only root")
		}
	}
	s.mu.Lock()
	delete(s.containers, c.id)
	s.mu.Unlock()
	released := s.shared.release(s.log.WithField("container", c.id), c.sources)
	s.forget(s.log.WithField("container", c.id), c.rootfs, released)
	s.log.WithField("container", c.id).Info("container removed")
	return &agentv1.RemoveContainerResponse{}, nil
}

// waitAll waits until the init and every started exec have exited.
func (c *container) waitAll(ctx context.Context, timeout time.Duration) error {
	c.mu.Lock()
	procs := []*process{c.init}
	for _, p := range c.execs {
		if p.io != nil {
			procs = append(procs, p)
		}
	}
	c.mu.Unlock()
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	for _, p := range procs {
		select {
		case <-p.done:
		case <-timer.C:
			// Not DeadlineExceeded, which the host takes for its own request's deadline (a hung agent, whose VM
			// it stops): this agent answered, and a process that outlives SIGKILL (one stuck in the kernel) is
			// its container's trouble, not the pod's.
			return status.Errorf(codes.FailedPrecondition, "remove container %s: %s still running %s after SIGKILL", c.id, processName(p), timeout)
		case <-ctx.Done():
			return status.FromContextError(ctx.Err()).Err()
		}
	}
	return nil
}

// CloseStdin closes the process's stdin once the host's input has arrived.
func (s *Service) CloseStdin(ctx context.Context, req *agentv1.CloseStdinRequest) (*agentv1.CloseStdinResponse, error) {
	c, err := s.get(req.GetContainerId())
	if err != nil {
		return nil, err
	}
	p, _, err := c.startedProcess(req.GetExecId())
	if err != nil {
		return nil, err
	}
	p.io.closeStdin()
	return &agentv1.CloseStdinResponse{}, nil
}

// ResizeTTY sets the window size of the process's terminal.
func (s *Service) ResizeTTY(ctx context.Context, req *agentv1.ResizeTTYRequest) (*agentv1.ResizeTTYResponse, error) {
	c, err := s.get(req.GetContainerId())
	if err != nil {
		return nil, err
	}
	p, _, err := c.startedProcess(req.GetExecId())
	if err != nil {
		return nil, err
	}
	if err := p.io.resize(req.GetWidth(), req.GetHeight()); err != nil {
		return nil, status.Errorf(codes.FailedPrecondition, "%s of container %s: %v", processName(p), c.id, err)
	}
	return &agentv1.ResizeTTYResponse{}, nil
}

// PauseContainer freezes the container's cgroup.
func (s *Service) PauseContainer(ctx context.Context, req *agentv1.PauseContainerRequest) (*agentv1.PauseContainerResponse, error) {
	c, err := s.get(req.GetContainerId())
	if err != nil {
		return nil, err
	}
	if err := c.move(lifecycle.Paused, c.lc.Pause); err != nil {
		return nil, err
	}
	return &agentv1.PauseContainerResponse{}, nil
}

// ResumeContainer thaws the container's cgroup.
func (s *Service) ResumeContainer(ctx context.Context, req *agentv1.ResumeContainerRequest) (*agentv1.ResumeContainerResponse, error) {
	c, err := s.get(req.GetContainerId())
	if err != nil {
		return nil, err
	}
	if err := c.move(lifecycle.Running, c.lc.Resume); err != nil {
		return nil, err
	}
	return &agentv1.ResumeContainerResponse{}, nil
}

// move does act and moves the container to next, when the table allows it.
func (c *container) move(next lifecycle.State, act func() error) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.init.sm.Can(next) {
		return transitionErr("container", c.id, &lifecycle.TransitionError{From: c.init.sm.State(), To: next})
	}
	if err := act(); err != nil {
		return fmt.Errorf("container %s to %s: %w", c.id, next, err)
	}
	return c.init.sm.Transition(next)
}

// UpdateContainer applies new cgroup resources.
func (s *Service) UpdateContainer(ctx context.Context, req *agentv1.UpdateContainerRequest) (*agentv1.UpdateContainerResponse, error) {
	c, err := s.get(req.GetContainerId())
	if err != nil {
		return nil, err
	}
	var r specs.LinuxResources
	if err := json.Unmarshal(req.GetResources(), &r); err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "update container %s: parse resources: %v", c.id, err)
	}
	r.HugepageLimits = guestHugepages(r.HugepageLimits, cgroups.HugePageSizes())
	// One update at a time: each merges into what the last one set. Not beside a Pause or Resume either, which
	// change the live configuration this reads; a slow cgroup write (memory.max reclaiming) then holds the
	// container's lookups (signals, exits) as long, which a resize can afford.
	c.updateMu.Lock()
	defer c.updateMu.Unlock()
	c.mu.Lock()
	defer c.mu.Unlock()
	config := c.lc.Config()
	if config.Cgroups == nil || config.Cgroups.Resources == nil {
		return nil, status.Errorf(codes.FailedPrecondition, "update container %s: no cgroup", c.id)
	}
	// The configuration's cgroup is the live one's (a pointer): the update gets copies.
	cg := *config.Cgroups
	cg.Resources = mergeResources(config.Cgroups.Resources, &r)
	config.Cgroups = &cg
	if err := c.lc.Set(config); err != nil {
		return nil, fmt.Errorf("update container %s: %w", c.id, err)
	}
	return &agentv1.UpdateContainerResponse{}, nil
}

// StatsContainer reads the container's cgroup v2 figures.
func (s *Service) StatsContainer(ctx context.Context, req *agentv1.StatsContainerRequest) (*agentv1.StatsContainerResponse, error) {
	c, err := s.get(req.GetContainerId())
	if err != nil {
		return nil, err
	}
	if c.cgroupDir == "" {
		return nil, status.Errorf(codes.FailedPrecondition, "stats of container %s: no cgroup", c.id)
	}
	stats, err := readStats(c.cgroupDir)
	if err != nil {
		return nil, fmt.Errorf("stats of container %s: %w", c.id, err)
	}
	return stats, nil
}

// ListProcesses lists the pids in the container's cgroup.
func (s *Service) ListProcesses(ctx context.Context, req *agentv1.ListProcessesRequest) (*agentv1.ListProcessesResponse, error) {
	c, err := s.get(req.GetContainerId())
	if err != nil {
		return nil, err
	}
	pids, err := c.lc.Processes()
	if err != nil {
		return nil, fmt.Errorf("list processes of container %s: %w", c.id, err)
	}
	c.mu.Lock()
	byPid := map[int]string{}
	for id, p := range c.execs {
		if p.pid != 0 && p.sm.State() == lifecycle.Running {
			byPid[p.pid] = id
		}
	}
	c.mu.Unlock()
	resp := &agentv1.ListProcessesResponse{}
	for _, pid := range pids {
		resp.Processes = append(resp.Processes, &agentv1.ProcessInfo{Pid: uint32(pid), ExecId: byPid[pid]})
	}
	return resp, nil
}

// Events streams exit and OOM events until the stream ends; events the
// stream could not take go back to the backlog.
func (s *Service) Events(ctx context.Context, _ *agentv1.EventsRequest, srv agentv1.Containers_EventsServer) error {
	sub := s.events.subscribe()
	for {
		e, err := sub.next(ctx)
		if err != nil {
			sub.close(nil)
			return nil
		}
		if err := srv.Send(e); err != nil {
			sub.close(e)
			return fmt.Errorf("send event: %w", err)
		}
	}
}
