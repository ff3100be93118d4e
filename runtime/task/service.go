package task

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"

	eventstypes "github.com/containerd/containerd/api/events"
	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	runtimeoptions "github.com/containerd/containerd/api/types/runtimeoptions/v1"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/protobuf"
	"github.com/containerd/containerd/v2/pkg/shim"
	"github.com/containerd/containerd/v2/pkg/shutdown"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/containerd/ttrpc"
	"github.com/containerd/typeurl/v2"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/sirupsen/logrus"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/kiln-runtime/kiln/config"
	"github.com/kiln-runtime/kiln/runtime/container"
	"github.com/kiln-runtime/kiln/runtime/share"
)

// Service is the task service of one shim: every task of its group runs in the same microVM, booted at the
// first Create and stopped at Shutdown once no task is left.
type Service struct {
	ctx       context.Context
	namespace string
	publisher shim.Publisher
	sd        shutdown.Service
	version   string
	// startMu is held from starting a process until its start event is queued; exit watchers take it before
	// queueing TaskExit, so a process that exits at once is never reported exited before it is reported started.
	startMu sync.Mutex
	events  chan any
	// loadConfig reads Kiln's configuration from a path given in the runtime options ("" for the default).
	loadConfig func(path string) (config.Config, error)

	// socket is the shim's own ttrpc socket address, when known.
	socket string

	// createMu serialises Create, so that the first one boots the VM alone.
	createMu sync.Mutex

	mu    sync.Mutex
	vm    *vmSandbox
	tasks map[string]*task
}

var _ taskAPI.TTRPCTaskService = (*Service)(nil)

// NewService makes the task service. ctx carries the shim's namespace and logger; the VM is stopped when sd
// shuts the shim down.
// version is the shim's build version, reported by Connect and compared with the guest agent's.
func NewService(ctx context.Context, publisher shim.Publisher, sd shutdown.Service, version string) (*Service, error) {
	ns, err := namespaces.NamespaceRequired(ctx)
	if err != nil {
		return nil, fmt.Errorf("kiln task service: %w", err)
	}
	s := &Service{
		ctx: ctx, namespace: ns, publisher: publisher, sd: sd, version: version,
		events:     make(chan any, eventQueue),
		loadConfig: config.Load,
		tasks:      map[string]*task{},
	}
	go s.forward(ctx)
	sd.RegisterCallback(s.stopSandbox)
	return s, nil
}

// RegisterTTRPC serves the task API on the shim's ttrpc server.
func (s *Service) RegisterTTRPC(server *ttrpc.Server) error {
	taskAPI.RegisterTTRPCTaskService(server, s)
	return nil
}

// log is the shim log with the sandbox, container and exec fields.
func (s *Service) log(containerID, execID string) *logrus.Entry {
	l := log.G(s.ctx).WithField("container", containerID)
	if execID != "" {
		l = l.WithField("exec", execID)
	}
	s.mu.Lock()
	if s.vm != nil {
		l = l.WithField("sandbox", s.vm.id)
	}
	s.mu.Unlock()
	return l
}

func (s *Service) getTask(id string) (*task, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	t, ok := s.tasks[id]
	if !ok {
		return nil, fmt.Errorf("task %s: %w", id, errdefs.ErrNotFound)
	}
	return t, nil
}

func (s *Service) getProcess(id, execID string) (*task, *proc, error) {
	t, err := s.getTask(id)
	if err != nil {
		return nil, nil, err
	}
	p, ok := t.process(execID)
	if !ok {
		return nil, nil, fmt.Errorf("process %s of task %s: %w", execID, id, errdefs.ErrNotFound)
	}
	return t, p, nil
}

// sandboxFor returns the shim's VM, booting it with the configuration the request names when there is none.
func (s *Service) sandboxFor(ctx context.Context, id string, opts *anypb.Any) (*vmSandbox, error) {
	s.mu.Lock()
	vm := s.vm
	s.mu.Unlock()
	if vm != nil {
		return vm, nil
	}
	path, err := configPath(opts)
	if err != nil {
		return nil, err
	}
	cfg, err := s.loadConfig(path)
	if err != nil {
		return nil, fmt.Errorf("%w: load kiln configuration: %v", errdefs.ErrInvalidArgument, err)
	}
	l := log.G(s.ctx).WithField("container", id)
	if cfg.Runtime.LogLevel == "debug" || cfg.Agent.Debug {
		l.Logger.SetLevel(logrus.DebugLevel)
	}
	vm, err = bootSandbox(ctx, cfg, VMID(s.namespace, groupOf(id)), s.version, l, s.onContainerEvent)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	s.vm = vm
	s.mu.Unlock()
	return vm, nil
}

// groupOf is the shim's group: the id the shim was started for (runtime/manager passes the group id as -id).
func groupOf(id string) string {
	if g := os.Getenv(GroupEnv); g != "" {
		return g
	}
	return id
}

// GroupEnv names the environment variable through which runtime/manager tells the shim its group.
const GroupEnv = "KILN_SHIM_GROUP"

// configPath is ConfigPath from containerd's runtime options, or "" when there are none.
func configPath(opts *anypb.Any) (string, error) {
	if opts == nil || len(opts.GetValue()) == 0 && opts.GetTypeUrl() == "" {
		return "", nil
	}
	v, err := typeurl.UnmarshalAny(opts)
	if err != nil {
		return "", fmt.Errorf("%w: decode runtime options %s: %v", errdefs.ErrInvalidArgument, opts.GetTypeUrl(), err)
	}
	if o, ok := v.(*runtimeoptions.Options); ok {
		return o.ConfigPath, nil
	}
	return "", fmt.Errorf("%w: runtime options of type %T: Kiln takes runtimeoptions.v1.Options (ConfigPath)", errdefs.ErrInvalidArgument, v)
}

// Create boots the VM if this is the group's first task, puts the rootfs and bind sources in the share and
// creates the container in the guest, its init process waiting to be started.
func (s *Service) Create(ctx context.Context, r *taskAPI.CreateTaskRequest) (_ *taskAPI.CreateTaskResponse, retErr error) {
	s.createMu.Lock()
	defer s.createMu.Unlock()
	l := s.log(r.ID, "")
	if _, err := s.getTask(r.ID); err == nil {
		return nil, toGRPC(fmt.Errorf("create task %s: %w", r.ID, errdefs.ErrAlreadyExists))
	}
	if r.Checkpoint != "" || r.ParentCheckpoint != "" {
		return nil, toGRPC(fmt.Errorf("create task %s from a checkpoint: %w", r.ID, errdefs.ErrNotImplemented))
	}
	spec, err := readSpec(r.Bundle)
	if err != nil {
		return nil, toGRPC(err)
	}
	vm, err := s.sandboxFor(ctx, r.ID, r.Options)
	if err != nil {
		return nil, toGRPC(fmt.Errorf("create task %s: %w", r.ID, err))
	}
	defer func() {
		if retErr != nil {
			s.stopIfIdle(ctx)
		}
	}()
	rootfs, err := addRootfs(ctx, vm.share, r, spec)
	if err != nil {
		return nil, toGRPC(fmt.Errorf("create task %s: %w", r.ID, err))
	}
	defer func() {
		if retErr != nil {
			if err := vm.share.RemoveContainer(context.WithoutCancel(ctx), r.ID); err != nil {
				l.WithError(err).Warn("remove container from share after a failed create")
			}
		}
	}()
	if err := vm.share.ShareSpecMounts(ctx, r.ID, r.Bundle, spec); err != nil {
		return nil, toGRPC(fmt.Errorf("create task %s: %w", r.ID, err))
	}
	raw, err := json.Marshal(spec)
	if err != nil {
		return nil, toGRPC(fmt.Errorf("create task %s: encode spec: %w", r.ID, err))
	}
	t := &task{id: r.ID, bundle: r.Bundle, execs: map[string]*proc{}}
	t.init = newProc(t, "", ioSpec{Stdin: r.Stdin, Stdout: r.Stdout, Stderr: r.Stderr, Terminal: r.Terminal})
	pio, err := openIO(ctx, r.ID, s.namespace, t.init.ioSpec)
	if err != nil {
		return nil, toGRPC(fmt.Errorf("create task %s: %w", r.ID, err))
	}
	t.init.io = pio
	c, err := vm.mgr.Create(ctx, container.CreateOptions{ID: r.ID, Spec: raw, Rootfs: rootfs, IO: pio.streams})
	if err != nil {
		_ = pio.Close()
		return nil, toGRPC(fmt.Errorf("create task %s: %w", r.ID, err))
	}
	t.ctr = c
	t.init.setHandle(c.Init())
	rec := Record{VMID: vm.id, StateDir: vm.cfg.Runtime.StateDir, ShareDir: vm.shareDir, ShimPid: os.Getpid(), ShimSocket: s.socket, Pid: c.Init().Pid()}
	if err := WriteRecord(r.Bundle, rec); err != nil {
		l.WithError(err).Warn("record task for cleanup after a shim crash")
	}
	s.mu.Lock()
	s.tasks[r.ID] = t
	s.mu.Unlock()
	go s.watch(t.init)
	s.send(&eventstypes.TaskCreate{
		ContainerID: r.ID,
		Bundle:      r.Bundle,
		Rootfs:      r.Rootfs,
		IO:          &eventstypes.TaskIO{Stdin: r.Stdin, Stdout: r.Stdout, Stderr: r.Stderr, Terminal: r.Terminal},
		Checkpoint:  r.Checkpoint,
		Pid:         t.init.getPid(),
	})
	l.WithField("pid", t.init.getPid()).Debug("task created")
	return &taskAPI.CreateTaskResponse{Pid: t.init.getPid()}, nil
}

// readSpec reads the bundle's config.json.
func readSpec(bundle string) (*specs.Spec, error) {
	b, err := os.ReadFile(filepath.Join(bundle, "config.json"))
	if err != nil {
		return nil, fmt.Errorf("read OCI spec of bundle %s: %w", bundle, err)
	}
	var spec specs.Spec
	if err := json.Unmarshal(b, &spec); err != nil {
		return nil, fmt.Errorf("%w: parse OCI spec of bundle %s: %v", errdefs.ErrInvalidArgument, bundle, err)
	}
	if spec.Process == nil {
		return nil, fmt.Errorf("%w: OCI spec of bundle %s has no process", errdefs.ErrInvalidArgument, bundle)
	}
	return &spec, nil
}

// addRootfs puts the task's root file system in the share: the snapshotter's mounts when containerd gives
// them, else the bundle's root directory.
func addRootfs(ctx context.Context, sh *share.Share, r *taskAPI.CreateTaskRequest, spec *specs.Spec) (string, error) {
	readonly := spec.Root != nil && spec.Root.Readonly
	if len(r.Rootfs) > 0 {
		mounts := make([]share.Mount, 0, len(r.Rootfs))
		for _, m := range r.Rootfs {
			mounts = append(mounts, share.Mount{Type: m.Type, Source: m.Source, Options: m.Options})
		}
		return sh.AddRootfsMounts(ctx, r.ID, mounts, readonly)
	}
	root := "rootfs"
	if spec.Root != nil && spec.Root.Path != "" {
		root = spec.Root.Path
	}
	if !filepath.IsAbs(root) {
		root = filepath.Join(r.Bundle, root)
	}
	return sh.AddRootfs(ctx, r.ID, root, readonly)
}

// Start runs a created task's init process, or an exec process added with Exec.
func (s *Service) Start(ctx context.Context, r *taskAPI.StartRequest) (*taskAPI.StartResponse, error) {
	s.startMu.Lock()
	defer s.startMu.Unlock()
	t, p, err := s.getProcess(r.ID, r.ExecID)
	if err != nil {
		return nil, toGRPC(err)
	}
	if err := p.lc.require("start", stateCreated); err != nil {
		return nil, toGRPC(fmt.Errorf("start %s: %w", describe(r.ID, r.ExecID), err))
	}
	if r.ExecID == "" {
		if err := t.ctr.Start(ctx); err != nil {
			return nil, toGRPC(err)
		}
		_ = p.lc.transition(stateRunning)
		s.send(&eventstypes.TaskStart{ContainerID: t.id, Pid: p.getPid()})
		return &taskAPI.StartResponse{Pid: p.getPid()}, nil
	}
	pio, err := openIO(ctx, r.ID, s.namespace, p.ioSpec)
	if err != nil {
		return nil, toGRPC(fmt.Errorf("start %s: %w", describe(r.ID, r.ExecID), err))
	}
	p.io = pio
	h, err := t.ctr.Exec(ctx, r.ExecID, p.spec, pio.streams)
	if err != nil {
		_ = pio.Close()
		return nil, toGRPC(err)
	}
	p.setHandle(h)
	_ = p.lc.transition(stateRunning)
	go s.watch(p)
	s.send(&eventstypes.TaskExecStarted{ContainerID: t.id, ExecID: r.ExecID, Pid: h.Pid()})
	return &taskAPI.StartResponse{Pid: h.Pid()}, nil
}

// Exec adds an exec process to a running task; Start runs it.
func (s *Service) Exec(ctx context.Context, r *taskAPI.ExecProcessRequest) (*emptyResp, error) {
	t, err := s.getTask(r.ID)
	if err != nil {
		return nil, toGRPC(err)
	}
	if r.ExecID == "" {
		return nil, toGRPC(fmt.Errorf("%w: exec in task %s: empty exec id", errdefs.ErrInvalidArgument, r.ID))
	}
	if err := t.init.lc.require("exec in", stateRunning); err != nil {
		return nil, toGRPC(fmt.Errorf("exec %s in task %s: %w", r.ExecID, r.ID, err))
	}
	var spec specs.Process
	if r.Spec == nil {
		return nil, toGRPC(fmt.Errorf("%w: exec %s in task %s: no process spec", errdefs.ErrInvalidArgument, r.ExecID, r.ID))
	}
	if err := json.Unmarshal(r.Spec.GetValue(), &spec); err != nil {
		return nil, toGRPC(fmt.Errorf("%w: exec %s in task %s: decode process spec: %v", errdefs.ErrInvalidArgument, r.ExecID, r.ID, err))
	}
	p := newProc(t, r.ExecID, ioSpec{Stdin: r.Stdin, Stdout: r.Stdout, Stderr: r.Stderr, Terminal: r.Terminal})
	p.spec = &spec
	t.mu.Lock()
	if _, ok := t.execs[r.ExecID]; ok {
		t.mu.Unlock()
		return nil, toGRPC(fmt.Errorf("exec %s in task %s: %w", r.ExecID, r.ID, errdefs.ErrAlreadyExists))
	}
	t.execs[r.ExecID] = p
	t.mu.Unlock()
	s.send(&eventstypes.TaskExecAdded{ContainerID: r.ID, ExecID: r.ExecID})
	return empty(), nil
}

// Delete removes a stopped (or never started) process. For the init process the container leaves the guest
// and the share; the VM stays until Shutdown.
func (s *Service) Delete(ctx context.Context, r *taskAPI.DeleteRequest) (*taskAPI.DeleteResponse, error) {
	t, p, err := s.getProcess(r.ID, r.ExecID)
	if err != nil {
		return nil, toGRPC(err)
	}
	if err := p.lc.require("delete", stateCreated, stateStopped); err != nil {
		return nil, toGRPC(fmt.Errorf("delete %s: %w", describe(r.ID, r.ExecID), err))
	}
	l := s.log(r.ID, r.ExecID)
	if r.ExecID != "" {
		if p.handle() != nil {
			if _, err := t.ctr.DeleteProcess(ctx, r.ExecID); err != nil && !errors.Is(err, container.ErrNotFound) {
				return nil, toGRPC(err)
			}
		}
		t.mu.Lock()
		delete(t.execs, r.ExecID)
		t.mu.Unlock()
	} else {
		if err := t.ctr.Delete(ctx, true); err != nil {
			return nil, toGRPC(err)
		}
		s.mu.Lock()
		vm := s.vm
		delete(s.tasks, r.ID)
		s.mu.Unlock()
		if vm != nil {
			if err := vm.share.RemoveContainer(ctx, r.ID); err != nil {
				l.WithError(err).Warn("remove container from share")
			}
		}
		if err := RemoveRecord(t.bundle); err != nil {
			l.WithError(err).Warn("remove task record")
		}
	}
	// A process deleted before it ran (or whose exit was never seen) ends here; the guest killed it.
	p.finish(container.Exit{Status: 128 + 9})
	if p.io != nil {
		if err := p.io.Close(); err != nil {
			l.WithError(err).Warn("close process IO")
		}
	}
	_ = p.lc.transition(stateDeleted)
	e, _ := p.exitStatus()
	if r.ExecID == "" {
		s.send(&eventstypes.TaskDelete{
			ContainerID: r.ID, ID: r.ID, Pid: e.Pid, ExitStatus: e.Status, ExitedAt: protobuf.ToTimestamp(e.ExitedAt),
		})
	}
	return &taskAPI.DeleteResponse{Pid: e.Pid, ExitStatus: e.Status, ExitedAt: protobuf.ToTimestamp(e.ExitedAt)}, nil
}

// stopIfIdle stops the VM when no task is left (after a failed first Create).
func (s *Service) stopIfIdle(ctx context.Context) {
	s.mu.Lock()
	idle := len(s.tasks) == 0
	s.mu.Unlock()
	if idle {
		if err := s.stopSandbox(context.WithoutCancel(ctx)); err != nil {
			log.G(s.ctx).WithError(err).Warn("stop idle sandbox")
		}
	}
}

// stopSandbox stops the VM, if there is one. It is the shim's shutdown callback too.
func (s *Service) stopSandbox(ctx context.Context) error {
	s.mu.Lock()
	vm := s.vm
	s.vm = nil
	s.mu.Unlock()
	if vm == nil {
		return nil
	}
	return vm.stop(ctx)
}

// Wait blocks until the process has exited and its output has been delivered.
func (s *Service) Wait(ctx context.Context, r *taskAPI.WaitRequest) (*taskAPI.WaitResponse, error) {
	_, p, err := s.getProcess(r.ID, r.ExecID)
	if err != nil {
		return nil, toGRPC(err)
	}
	select {
	case <-p.exited:
	case <-ctx.Done():
		return nil, toGRPC(ctx.Err())
	}
	e, _ := p.exitStatus()
	return &taskAPI.WaitResponse{ExitStatus: e.Status, ExitedAt: protobuf.ToTimestamp(e.ExitedAt)}, nil
}

// Kill signals the init process (with all, every process of the task) or an exec process.
func (s *Service) Kill(ctx context.Context, r *taskAPI.KillRequest) (*emptyResp, error) {
	t, p, err := s.getProcess(r.ID, r.ExecID)
	if err != nil {
		return nil, toGRPC(err)
	}
	switch p.lc.get() {
	case stateStopped, stateDeleted:
		if !r.All {
			return nil, toGRPC(fmt.Errorf("kill %s: %w: process already finished", describe(r.ID, r.ExecID), errdefs.ErrNotFound))
		}
	}
	if r.ExecID == "" {
		if err := t.ctr.Kill(ctx, r.Signal, r.All); err != nil {
			return nil, toGRPC(err)
		}
		return empty(), nil
	}
	h := p.handle()
	if h == nil {
		return nil, toGRPC(fmt.Errorf("kill %s: %w: not started", describe(r.ID, r.ExecID), errdefs.ErrFailedPrecondition))
	}
	if err := h.Signal(ctx, r.Signal); err != nil {
		return nil, toGRPC(err)
	}
	return empty(), nil
}

// describe names a process in errors.
func describe(id, execID string) string {
	if execID == "" {
		return "task " + id
	}
	return fmt.Sprintf("exec %s of task %s", execID, id)
}
