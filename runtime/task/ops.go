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
	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/typeurl/v2"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/kiln-runtime/kiln/runtime/container"
)

// stdinDrainTimeout bounds how long CloseIO waits for containerd's stdin to be relayed before closing the
// process's input.
const stdinDrainTimeout = 5 * time.Second

type emptyResp = emptypb.Empty

func empty() *emptyResp { return &emptypb.Empty{} }

// toGRPC gives an error the errdefs kind containerd understands, then its ttrpc status.
func toGRPC(err error) error {
	if err == nil {
		return nil
	}
	switch {
	case errors.Is(err, container.ErrNotFound):
		err = fmt.Errorf("%w: %w", errdefs.ErrNotFound, err)
	case errors.Is(err, container.ErrAlreadyExists):
		err = fmt.Errorf("%w: %w", errdefs.ErrAlreadyExists, err)
	case errors.Is(err, container.ErrInvalidState):
		err = fmt.Errorf("%w: %w", errdefs.ErrFailedPrecondition, err)
	case errors.Is(err, container.ErrClosed), errors.Is(err, container.ErrDeleted):
		err = fmt.Errorf("%w: %w", errdefs.ErrUnavailable, err)
	}
	return errgrpc.ToGRPC(err)
}

// State describes a process.
func (s *Service) State(ctx context.Context, r *taskAPI.StateRequest) (*taskAPI.StateResponse, error) {
	t, p, err := s.getProcess(r.ID, r.ExecID)
	if err != nil {
		return nil, toGRPC(err)
	}
	resp := &taskAPI.StateResponse{
		ID:       p.id(),
		ExecID:   r.ExecID,
		Bundle:   t.bundle,
		Pid:      p.getPid(),
		Status:   p.lc.get().status(),
		Stdin:    p.ioSpec.Stdin,
		Stdout:   p.ioSpec.Stdout,
		Stderr:   p.ioSpec.Stderr,
		Terminal: p.ioSpec.Terminal,
	}
	if e, ok := p.exitStatus(); ok {
		resp.ExitStatus = e.Status
		resp.ExitedAt = protobuf.ToTimestamp(e.ExitedAt)
	}
	return resp, nil
}

// Pids lists the task's processes in the guest, with the exec id of those started through Exec.
func (s *Service) Pids(ctx context.Context, r *taskAPI.PidsRequest) (*taskAPI.PidsResponse, error) {
	t, err := s.getTask(r.ID)
	if err != nil {
		return nil, toGRPC(err)
	}
	ps, err := t.ctr.Pids(ctx)
	if err != nil {
		return nil, toGRPC(err)
	}
	resp := &taskAPI.PidsResponse{}
	for _, p := range ps {
		info := &tasktypes.ProcessInfo{Pid: p.GetPid()}
		if p.GetExecId() != "" {
			a, err := typeurl.MarshalAnyToProto(&options.ProcessDetails{ExecID: p.GetExecId()})
			if err != nil {
				return nil, toGRPC(fmt.Errorf("pids of task %s: encode process details: %w", r.ID, err))
			}
			info.Info = a
		}
		resp.Processes = append(resp.Processes, info)
	}
	return resp, nil
}

// Pause freezes the task's processes.
func (s *Service) Pause(ctx context.Context, r *taskAPI.PauseRequest) (*emptyResp, error) {
	t, err := s.getTask(r.ID)
	if err != nil {
		return nil, toGRPC(err)
	}
	if err := t.init.lc.require("pause", stateRunning); err != nil {
		return nil, toGRPC(fmt.Errorf("pause task %s: %w", r.ID, err))
	}
	if err := t.ctr.Pause(ctx); err != nil {
		return nil, toGRPC(err)
	}
	if err := t.init.lc.transition(statePaused); err != nil {
		return nil, toGRPC(fmt.Errorf("pause task %s: %w", r.ID, err))
	}
	s.send(&eventstypes.TaskPaused{ContainerID: r.ID})
	return empty(), nil
}

// Resume thaws a paused task.
func (s *Service) Resume(ctx context.Context, r *taskAPI.ResumeRequest) (*emptyResp, error) {
	t, err := s.getTask(r.ID)
	if err != nil {
		return nil, toGRPC(err)
	}
	if err := t.init.lc.require("resume", statePaused); err != nil {
		return nil, toGRPC(fmt.Errorf("resume task %s: %w", r.ID, err))
	}
	if err := t.ctr.Resume(ctx); err != nil {
		return nil, toGRPC(err)
	}
	if err := t.init.lc.transition(stateRunning); err != nil {
		return nil, toGRPC(fmt.Errorf("resume task %s: %w", r.ID, err))
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
	h := p.handle()
	if h == nil {
		return nil, toGRPC(fmt.Errorf("resize %s: %w: not started", describe(r.ID, r.ExecID), errdefs.ErrFailedPrecondition))
	}
	if !p.ioSpec.Terminal {
		return nil, toGRPC(fmt.Errorf("resize %s: %w: no terminal", describe(r.ID, r.ExecID), errdefs.ErrFailedPrecondition))
	}
	if err := h.Resize(ctx, r.Width, r.Height); err != nil {
		return nil, toGRPC(err)
	}
	return empty(), nil
}

// CloseIO ends a process's input. Bytes containerd already wrote to the stdin fifo are relayed first.
func (s *Service) CloseIO(ctx context.Context, r *taskAPI.CloseIORequest) (*emptyResp, error) {
	_, p, err := s.getProcess(r.ID, r.ExecID)
	if err != nil {
		return nil, toGRPC(err)
	}
	if !r.Stdin {
		return empty(), nil
	}
	h := p.handle()
	if h == nil || p.io == nil {
		return empty(), nil
	}
	if !p.ioSpec.Terminal {
		t := time.NewTimer(stdinDrainTimeout)
		select {
		case <-p.io.stdinEOF:
		case <-p.exited:
		case <-t.C:
			s.log(r.ID, r.ExecID).Warn("stdin still open after CloseIO; closing it")
		case <-ctx.Done():
		}
		t.Stop()
	}
	if err := h.CloseStdin(ctx); err != nil {
		return nil, toGRPC(err)
	}
	return empty(), nil
}

// Update applies new cgroup resources to the task.
func (s *Service) Update(ctx context.Context, r *taskAPI.UpdateTaskRequest) (*emptyResp, error) {
	t, err := s.getTask(r.ID)
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
	if err := t.ctr.Update(ctx, res); err != nil {
		return nil, toGRPC(err)
	}
	return empty(), nil
}

// Stats returns the task's cgroup v2 figures from the guest, as containerd's cgroups v2 metrics.
func (s *Service) Stats(ctx context.Context, r *taskAPI.StatsRequest) (*taskAPI.StatsResponse, error) {
	t, err := s.getTask(r.ID)
	if err != nil {
		return nil, toGRPC(err)
	}
	st, err := t.ctr.Stats(ctx)
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
	if t, err := s.getTask(r.ID); err == nil {
		resp.TaskPid = t.init.getPid()
	}
	return resp, nil
}

// Shutdown ends the shim once it serves no task: the VM is stopped by the shutdown callback.
func (s *Service) Shutdown(ctx context.Context, r *taskAPI.ShutdownRequest) (*emptyResp, error) {
	s.mu.Lock()
	n := len(s.tasks)
	s.mu.Unlock()
	if n > 0 && !r.Now {
		return empty(), nil
	}
	s.sd.Shutdown()
	return empty(), nil
}
