package task

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	eventstypes "github.com/containerd/containerd/api/events"
	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/containerd/api/types/runc/options"
	tasktypes "github.com/containerd/containerd/api/types/task"
	"github.com/containerd/containerd/v2/pkg/protobuf"
	"github.com/containerd/containerd/v2/pkg/shim"
	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/log"
	"github.com/containerd/typeurl/v2"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"google.golang.org/grpc/codes"
	grpcstatus "google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/kiln-runtime/kiln/proto/lifecycle"
	"github.com/kiln-runtime/kiln/runtime/container"
)

type emptyResp = emptypb.Empty

func empty() *emptyResp { return &emptypb.Empty{} }

// toGRPC is the one place that gives internal errors the errdefs kind containerd understands, then their ttrpc
// status.
func toGRPC(err error) error {
	if err == nil {
		return nil
	}
	switch {
	case errors.Is(err, container.ErrNotFound):
		err = fmt.Errorf("%w: %w", errdefs.ErrNotFound, err)
	case errors.Is(err, container.ErrAlreadyExists):
		err = fmt.Errorf("%w: %w", errdefs.ErrAlreadyExists, err)
	case errors.Is(err, container.ErrInvalidArgument):
		err = fmt.Errorf("%w: %w", errdefs.ErrInvalidArgument, err)
	case errors.Is(err, container.ErrInvalidState):
		err = fmt.Errorf("%w: %w", errdefs.ErrFailedPrecondition, err)
	case errors.Is(err, container.ErrClosed), errors.Is(err, container.ErrDeleted):
		err = fmt.Errorf("%w: %w", errdefs.ErrUnavailable, err)
	}
	var peer interface{ GRPCStatus() *grpcstatus.Status }
	if errors.As(err, &peer) {
		// An answer of the agent (or of a spare shim) in the chain: errgrpc would pass its status on as it is.
		code := grpcstatus.Code(errgrpc.ToGRPC(errdefs.Resolve(err)))
		if c := peer.GRPCStatus().Code(); code == codes.Unknown && onlyReported(c) {
			code = c
		}
		return grpcstatus.Error(code, err.Error())
	}
	return errgrpc.ToGRPC(err)
}

// onlyReported says whether containerd only reports a task API error of code c, and takes it for nothing about the
// task. A peer's answer keeps such a code; the others (NotFound: the task or process is gone; AlreadyExists;
// Unimplemented: try again with an older task API; Unavailable: the shim is gone; Canceled; DeadlineExceeded) are
// for Kiln's own kinds to give: an agent's NotFound for a removal would have containerd forget a task whose VM, share
// and taps the shim still holds.
func onlyReported(c codes.Code) bool {
	switch c {
	case codes.InvalidArgument, codes.FailedPrecondition, codes.ResourceExhausted, codes.PermissionDenied, codes.OutOfRange:
		return true
	}
	return false
}

// status is a lifecycle state as containerd's API spells it.
func status(s lifecycle.State) tasktypes.Status {
	switch s {
	case lifecycle.Created:
		return tasktypes.Status_CREATED
	case lifecycle.Running:
		return tasktypes.Status_RUNNING
	case lifecycle.Paused:
		return tasktypes.Status_PAUSED
	case lifecycle.Stopped, lifecycle.Deleted:
		return tasktypes.Status_STOPPED
	}
	return tasktypes.Status_UNKNOWN
}

// processID is the id containerd uses for a process in events: the container id for init, else the exec id.
func processID(c *container.Container, p *container.Process) string {
	if p.ID() == "" {
		return c.ID()
	}
	return p.ID()
}

// ioOf is the containerd IO a process was given (Create and Exec pass a *procIO as its release).
func ioOf(p *container.Process) *procIO {
	pio, _ := p.Release().(*procIO)
	return pio
}

// State describes a process.
func (s *Service) State(ctx context.Context, r *taskAPI.StateRequest) (*taskAPI.StateResponse, error) {
	c, p, err := s.getProcess(r.ID, r.ExecID)
	if err != nil {
		return nil, toGRPC(err)
	}
	resp := &taskAPI.StateResponse{
		ID:       processID(c, p),
		ExecID:   r.ExecID,
		Bundle:   c.Bundle(),
		Pid:      c.HostPid(),
		Status:   status(p.State()),
		Terminal: p.Terminal(),
	}
	if pio := ioOf(p); pio != nil {
		resp.Stdin, resp.Stdout, resp.Stderr = pio.spec.Stdin, pio.spec.Stdout, pio.spec.Stderr
	}
	if e, ok := p.ExitStatus(); ok {
		resp.ExitStatus = e.Status
		resp.ExitedAt = protobuf.ToTimestamp(e.ExitedAt)
	}
	return resp, nil
}

// Delete removes a stopped (or never started) process. For the init process the container leaves the guest
// and the share; the pod stays until Shutdown.
func (s *Service) Delete(ctx context.Context, r *taskAPI.DeleteRequest) (*taskAPI.DeleteResponse, error) {
	// The pod the container was found in is the one it leaves: a second look could find none (shut down).
	p := s.currentPod()
	if p == nil {
		return nil, toGRPC(fmt.Errorf("task %s: %w", r.ID, errdefs.ErrNotFound))
	}
	c, err := p.Containers().Get(r.ID)
	if err != nil {
		return nil, toGRPC(err)
	}
	if r.ExecID != "" {
		e, err := c.DeleteProcess(ctx, r.ExecID)
		if err != nil {
			return nil, toGRPC(err)
		}
		return &taskAPI.DeleteResponse{Pid: c.HostPid(), ExitStatus: e.Status, ExitedAt: protobuf.ToTimestamp(e.ExitedAt)}, nil
	}
	s.letGo(r.ID, "", s.createHolds(r.ID))
	s.mu.Lock()
	if s.deletes == nil {
		s.deletes = map[string]int{}
	}
	s.deletes[r.ID]++
	s.mu.Unlock()
	defer s.deleteEnded(ctx, r.ID)
	e, err := p.DeleteContainer(ctx, c, false)
	if err != nil {
		return nil, toGRPC(err)
	}
	if err := RemoveRecord(c.Bundle()); err != nil {
		s.log(r.ID, "").WithError(err).Warn("remove task record")
	}
	s.send(&eventstypes.TaskDelete{
		ContainerID: r.ID, ID: r.ID, Pid: c.HostPid(), ExitStatus: e.Status, ExitedAt: protobuf.ToTimestamp(e.ExitedAt),
	})
	return &taskAPI.DeleteResponse{Pid: c.HostPid(), ExitStatus: e.Status, ExitedAt: protobuf.ToTimestamp(e.ExitedAt)}, nil
}

// deleteEnded ends task id's Delete. containerd follows each task's delete with a Shutdown naming it: the one after
// the last delete stops the pod, and one that named this task while its Delete was under way is carried out here,
// if no task is left. That one comes when containerd gave a slow Delete up (CRI deletes under 10 s; the container
// had left the registry, so containerd's retry found no task and went on to the Shutdown, then forgot the shim):
// held back until now, it was dropped, and the shim and its VM ran on with no one to stop them.
func (s *Service) deleteEnded(ctx context.Context, id string) {
	s.mu.Lock()
	if s.deletes[id]--; s.deletes[id] <= 0 {
		delete(s.deletes, id)
	}
	asked := s.shutdownOnDelete[id] && s.deletes[id] == 0
	if asked {
		delete(s.shutdownOnDelete, id)
	}
	s.mu.Unlock()
	if asked && !s.busy() {
		s.shutdownNow(context.WithoutCancel(ctx))
	}
}

// stopIfIdle stops the pod when no task is left and no other Create, nor a Delete, is under way (after a failed
// first Create). A Delete's container has left the pod's registry before its poststop hooks ran and its share
// went; the Shutdown containerd asks for after it stops the pod.
func (s *Service) stopIfIdle(ctx context.Context) {
	s.mu.Lock()
	// The count with the others: a Delete counts itself before its container leaves the registry.
	p := s.pod
	idle := p != nil && s.creating <= 1 && len(s.deletes) == 0 && p.Containers().Len() == 0
	s.mu.Unlock()
	if idle {
		if err := s.stopPod(context.WithoutCancel(ctx)); err != nil {
			log.G(s.ctx).WithError(err).Warn("stop idle pod")
		}
	}
}

// shutdown is the shim's shutdown callback: the pod stopped (or the stop under way finished), and the events it
// left published.
func (s *Service) shutdown(ctx context.Context) error {
	// A shim ended by a signal gets here without shutdownNow.
	s.end()
	s.removeSocket()
	err := s.stopPod(ctx)
	s.flushEvents(ctx)
	return err
}

// stopPod stops the pod, if there is one, and waits for a spare's VM stopping in the background (takeSpare). One
// runs at a time: a second returns once the first stopped the pod.
func (s *Service) stopPod(ctx context.Context) error {
	s.stopMu.Lock()
	defer s.stopMu.Unlock()
	defer s.spareStops.Wait()
	// A spare whose first Create failed before taking it (a checkpoint asked for, a bundle that no longer loads)
	// still holds its VM: nothing else would stop it.
	s.bootMu.Lock()
	sp := s.spare
	s.spare = nil
	s.bootMu.Unlock()
	if sp != nil {
		sp.stop(ctx, log.G(s.ctx))
	}
	s.mu.Lock()
	p := s.pod
	s.pod = nil
	s.mu.Unlock()
	if p == nil {
		return nil
	}
	return p.Close(ctx)
}

// Wait blocks until the process has exited and its output has been delivered.
func (s *Service) Wait(ctx context.Context, r *taskAPI.WaitRequest) (*taskAPI.WaitResponse, error) {
	_, p, err := s.getProcess(r.ID, r.ExecID)
	if err != nil {
		return nil, toGRPC(err)
	}
	e, err := p.Wait(ctx)
	// A process deleted or cut off before its exit was seen ends as killed.
	if err != nil && !errors.Is(err, container.ErrDeleted) && !errors.Is(err, container.ErrClosed) {
		return nil, toGRPC(err)
	}
	return &taskAPI.WaitResponse{ExitStatus: e.Status, ExitedAt: protobuf.ToTimestamp(e.ExitedAt)}, nil
}

// Kill signals the init process (with all, every process of the task) or an exec process.
func (s *Service) Kill(ctx context.Context, r *taskAPI.KillRequest) (*emptyResp, error) {
	c, p, err := s.getProcess(r.ID, r.ExecID)
	if err != nil {
		return nil, toGRPC(err)
	}
	if st := p.State(); (st == lifecycle.Stopped || st == lifecycle.Deleted) && !r.All {
		return nil, toGRPC(fmt.Errorf("kill %s: %w: process already finished", describe(r.ID, r.ExecID), errdefs.ErrNotFound))
	}
	if r.ExecID == "" {
		err = c.Kill(ctx, r.Signal, r.All)
	} else {
		err = p.Signal(ctx, r.Signal)
	}
	return empty(), toGRPC(err)
}

// Pids lists the task's processes as containerd's clients read them, by host pid: every one of them has the
// container's (its stand-in's, runtime/standin), since the processes run in the guest, where their own pids
// name nothing on the host (nerdctl top hands them to the host's ps). So the list is the container, once,
// and each process started through Exec that still runs, with its exec id.
func (s *Service) Pids(ctx context.Context, r *taskAPI.PidsRequest) (*taskAPI.PidsResponse, error) {
	c, err := s.getContainer(r.ID)
	if err != nil {
		return nil, toGRPC(err)
	}
	ps, err := c.Pids(ctx)
	if err != nil {
		return nil, toGRPC(err)
	}
	resp := &taskAPI.PidsResponse{Processes: []*tasktypes.ProcessInfo{{Pid: c.HostPid()}}}
	for _, p := range ps {
		if p.GetExecId() == "" {
			continue
		}
		a, err := typeurl.MarshalAnyToProto(&options.ProcessDetails{ExecID: p.GetExecId()})
		if err != nil {
			return nil, toGRPC(fmt.Errorf("pids of task %s: encode process details: %w", r.ID, err))
		}
		resp.Processes = append(resp.Processes, &tasktypes.ProcessInfo{Pid: c.HostPid(), Info: a})
	}
	return resp, nil
}

// Pause freezes the task's processes.
func (s *Service) Pause(ctx context.Context, r *taskAPI.PauseRequest) (*emptyResp, error) {
	c, err := s.getContainer(r.ID)
	if err != nil {
		return nil, toGRPC(err)
	}
	if err := c.Pause(ctx); err != nil {
		return nil, toGRPC(err)
	}
	s.send(&eventstypes.TaskPaused{ContainerID: r.ID})
	return empty(), nil
}

// Resume thaws a paused task.
func (s *Service) Resume(ctx context.Context, r *taskAPI.ResumeRequest) (*emptyResp, error) {
	c, err := s.getContainer(r.ID)
	if err != nil {
		return nil, toGRPC(err)
	}
	if err := c.Resume(ctx); err != nil {
		return nil, toGRPC(err)
	}
	s.send(&eventstypes.TaskResumed{ContainerID: r.ID})
	return empty(), nil
}

// Checkpoint is not supported: the guest's containers cannot be checkpointed from the host.
func (s *Service) Checkpoint(ctx context.Context, r *taskAPI.CheckpointTaskRequest) (*emptyResp, error) {
	return nil, toGRPC(fmt.Errorf("checkpoint task %s: %w", r.ID, errdefs.ErrNotImplemented))
}

// ResizePty sets the terminal size of a process.
func (s *Service) ResizePty(ctx context.Context, r *taskAPI.ResizePtyRequest) (*emptyResp, error) {
	_, p, err := s.getProcess(r.ID, r.ExecID)
	if err != nil {
		return nil, toGRPC(err)
	}
	return empty(), toGRPC(p.Resize(ctx, r.Width, r.Height))
}

// CloseIO ends a process's input. Bytes containerd already wrote to the stdin fifo are relayed first, however
// long the process takes to read them, and the process reads EOF after them, whether or not the client's writer
// is still open; it returns at once, as runc's shim does.
func (s *Service) CloseIO(ctx context.Context, r *taskAPI.CloseIORequest) (*emptyResp, error) {
	_, p, err := s.getProcess(r.ID, r.ExecID)
	if err != nil {
		return nil, toGRPC(err)
	}
	if !r.Stdin {
		return empty(), nil
	}
	pio := ioOf(p)
	if pio != nil && !p.Terminal() && pio.drainStdin() {
		return empty(), nil
	}
	err = p.CloseStdin(ctx)
	if pio != nil && p.Terminal() {
		pio.stopStdin()
	}
	return empty(), toGRPC(err)
}

// Update applies new cgroup resources to the task.
func (s *Service) Update(ctx context.Context, r *taskAPI.UpdateTaskRequest) (*emptyResp, error) {
	c, err := s.getContainer(r.ID)
	if err != nil {
		return nil, toGRPC(err)
	}
	v, err := typeurl.UnmarshalAny(r.Resources)
	if err != nil {
		return nil, toGRPC(fmt.Errorf("%w: update task %s: decode resources: %v", errdefs.ErrInvalidArgument, r.ID, err))
	}
	res, ok := v.(*specs.LinuxResources)
	if !ok {
		return nil, toGRPC(fmt.Errorf("%w: update task %s: resources of type %T, want LinuxResources", errdefs.ErrInvalidArgument, r.ID, v))
	}
	if p := s.currentPod(); p != nil {
		return empty(), toGRPC(p.Update(ctx, c, res))
	}
	return empty(), toGRPC(c.Update(ctx, res))
}

// Stats returns the task's cgroup v2 figures from the guest, as containerd's cgroups v2 metrics.
func (s *Service) Stats(ctx context.Context, r *taskAPI.StatsRequest) (*taskAPI.StatsResponse, error) {
	c, err := s.getContainer(r.ID)
	if err != nil {
		return nil, toGRPC(err)
	}
	st, err := c.Stats(ctx)
	if err != nil {
		return nil, toGRPC(err)
	}
	a, err := typeurl.MarshalAnyToProto(metrics(st))
	if err != nil {
		return nil, toGRPC(fmt.Errorf("stats of task %s: encode metrics: %w", r.ID, err))
	}
	return &taskAPI.StatsResponse{Stats: a}, nil
}

// Connect tells containerd the shim's pid and the task's.
func (s *Service) Connect(ctx context.Context, r *taskAPI.ConnectRequest) (*taskAPI.ConnectResponse, error) {
	resp := &taskAPI.ConnectResponse{ShimPid: uint32(os.Getpid()), Version: s.version}
	if c, err := s.getContainer(r.ID); err == nil {
		resp.TaskPid = c.HostPid()
	}
	return resp, nil
}

// shutdownWait bounds how long Shutdown stops the pod before it answers: containerd 2.4 gives the call 3 s and fails
// the task's delete past them. A pod still stopping then (a hung guest: the agent's shutdown, the power-off and
// QEMU's stop take 3 s each at most) is left to the shutdown callback, which the shim waits for before it exits.
const shutdownWait = 2500 * time.Millisecond

// Shutdown ends the shim once it serves no task, and no Create or Delete is under way (containerd deletes a pod's
// tasks at once when its VM ends, and each delete asks for a Shutdown). The pod is stopped before the reply, for
// shutdownWait at most: the shim's shutdown callbacks run after it, while containerd goes on, so a pod stopped
// there could leave its VM's state and share on the host after containerd reported the task (or CRI the sandbox)
// removed. The callback stays for a shim ended by a signal, and for a stop that takes longer.
func (s *Service) Shutdown(ctx context.Context, r *taskAPI.ShutdownRequest) (*emptyResp, error) {
	if !r.Now && s.busy() {
		s.mu.Lock()
		// Carried out once the Create under way failed and left no task (shutdownIfAsked), or the Delete of the task
		// it names ended and left none (deleteEnded). Otherwise it is the Shutdown containerd sends after each
		// task's delete, and the pod has other tasks.
		if s.deletes[r.ID] > 0 {
			if s.shutdownOnDelete == nil {
				s.shutdownOnDelete = map[string]bool{}
			}
			s.shutdownOnDelete[r.ID] = true
		} else if s.creating > 0 {
			s.shutdownAsked = true
		}
		s.mu.Unlock()
		return empty(), nil
	}
	s.shutdownNow(ctx)
	return empty(), nil
}

// shutdownIfAsked carries out a Shutdown that came while a Create was under way, once the Create failed and no task
// is left (a Delete's is deleteEnded's).
func (s *Service) shutdownIfAsked(ctx context.Context) {
	if s.busy() {
		return
	}
	s.mu.Lock()
	asked := s.shutdownAsked
	s.shutdownAsked = false
	s.mu.Unlock()
	if asked {
		s.shutdownNow(ctx)
	}
}

// shutdownNow stops the pod, for shutdownWait at most, and ends the shim.
func (s *Service) shutdownNow(ctx context.Context) {
	s.end()
	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		if err := s.stopPod(context.WithoutCancel(ctx)); err != nil {
			log.G(s.ctx).WithError(err).Warn("stop pod at shutdown")
		}
	}()
	t := time.NewTimer(shutdownWait)
	select {
	case <-stopped:
	case <-t.C:
		log.G(s.ctx).Warn("the pod is still stopping; the shim exits once it has")
	}
	t.Stop()
	// Before the server stops listening, while the socket is certainly this shim's and not a successor's.
	s.removeSocket()
	s.sd.Shutdown()
}

// end marks the shim's stop begun: a pod a Create boots from now is stopped instead of kept (podFor).
func (s *Service) end() {
	s.mu.Lock()
	s.ending = true
	s.mu.Unlock()
}

// removeSocket removes the shim's socket, once. containerd's shim package removes, as the server ends, the socket
// it derives from the server's -id and the socket directory linked in the server's bundle: a pod's server runs for
// its first container, whose id need not be the group's (the socket's name), in a bundle containerd may have
// removed with that container meanwhile.
func (s *Service) removeSocket() {
	s.socketOnce.Do(func() {
		if s.socket == "" {
			return
		}
		if err := shim.RemoveSocket(s.socket); err != nil && !errors.Is(err, os.ErrNotExist) {
			log.G(s.ctx).WithError(err).Warn("remove the shim's socket")
		}
	})
}

// busy says whether the shim still serves a task, or a Create or a task's Delete is under way.
func (s *Service) busy() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.creating > 0 || len(s.deletes) > 0 || s.pod != nil && s.pod.Containers().Len() > 0
}

// describe names a process in errors.
func describe(id, execID string) string {
	if execID == "" {
		return "task " + id
	}
	return fmt.Sprintf("exec %s of task %s", execID, id)
}
