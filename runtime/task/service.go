package task

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sync"

	eventstypes "github.com/containerd/containerd/api/events"
	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	runcoptions "github.com/containerd/containerd/api/types/runc/options"
	runtimeoptions "github.com/containerd/containerd/api/types/runtimeoptions/v1"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/shim"
	"github.com/containerd/containerd/v2/pkg/shutdown"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/containerd/ttrpc"
	"github.com/containerd/typeurl/v2"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/sirupsen/logrus"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/kiln-runtime/kiln/config"
	"github.com/kiln-runtime/kiln/runtime/bundle"
	"github.com/kiln-runtime/kiln/runtime/container"
	"github.com/kiln-runtime/kiln/runtime/hostlsm"
	"github.com/kiln-runtime/kiln/runtime/pod"
	"github.com/kiln-runtime/kiln/runtime/spare"
	"github.com/kiln-runtime/kiln/runtime/standin"
)

// Service is the task service of one shim: every task of its group runs in the same pod, booted at the first
// Create and stopped at Shutdown once no task is left. Its handlers look the process up in the pod's registry,
// call it, map the error and publish the event; the pod and runtime/container own every state.
type Service struct {
	ctx       context.Context
	namespace string
	publisher shim.Publisher
	sd        shutdown.Service
	version   string
	events    chan any
	ooms      oomQueue
	// loadConfig reads Kiln's configuration from a path given in the runtime options ("" for the default).
	loadConfig func(path string) (config.Config, error)
	// standIns holds the threads of the stand-ins of the pods the service boots (pod.Options.StandIns).
	standIns *standin.Pool

	// socket is the shim's own ttrpc socket address, when known.
	socket     string
	socketOnce sync.Once
	// containerd is containerd's address, which keys its spare shims.
	containerd string

	// bootMu serialises finding or booting the pod, so that the first Create boots it alone; containers are
	// then created concurrently (the pod's registry reserves each id).
	bootMu sync.Mutex

	mu  sync.Mutex
	pod *pod.Pod
	// spare is the pod this shim held as a spare, until the first Create takes or stops it (under bootMu).
	spare *Spare
	// spareGate holds back the spare this shim started until this shim exits or releaseSpare lets it boot
	// (spare.Spawn).
	spareGate *os.File
	// held are the spares still booting that this shim's `start` held (spare.Hold): let go once the task's start
	// is over (Start).
	held *spare.Held
	// creates are the spares still booting that each container's Create held, by container id: let go once that
	// container has started, or is deleted (under mu).
	creates map[string]*spare.Held
	// spareStops counts a spare's VM being stopped beside the task's start (takeSpare); stopPod waits for it.
	spareStops sync.WaitGroup
	// creating counts Creates in progress: a failed first Create stops the pod only when no other is, nor a
	// Delete (deletes). Shutdown leaves a pod alone while either is under way.
	creating int
	// shutdownAsked says a Shutdown came while a Create was under way (under mu).
	shutdownAsked bool
	// deletes counts the Deletes under way by task id (none left: no entry), and shutdownOnDelete holds the ids of those a Shutdown
	// named meanwhile (under mu): containerd gives a slow Delete up, finds the task gone on its retry and sends
	// the Shutdown, which the Delete carries out when it ends (deleteEnded).
	deletes          map[string]int
	shutdownOnDelete map[string]bool
	// ending says the shim's stop began (under mu): a pod booted after it is stopped, not kept.
	ending bool
	// unannounced holds the events of the containers a Create is making, by id, until the Create has published
	// their TaskCreate (under mu): an init the guest lost, or the OOM killer took, meanwhile is not reported to
	// containerd before the task it belongs to.
	unannounced map[string][]any
	// stopMu makes one stopPod at a time: a second (a Shutdown beside another, the shutdown callback) waits for
	// the pod the first is stopping instead of letting the shim exit under it.
	stopMu sync.Mutex
}

var _ taskAPI.TTRPCTaskService = (*Service)(nil)

// NewService makes the task service. ctx carries the shim's namespace and logger; the pod is stopped when sd
// shuts the shim down. version is the shim's build version, reported by Connect and compared with the guest
// agent's. threads holds the stand-ins of the pods it boots: a spare shim's, whose pod's are there already, or
// nil for a pool of its own.
func NewService(ctx context.Context, publisher shim.Publisher, sd shutdown.Service, version string, threads *standin.Pool) (*Service, error) {
	ns, err := namespaces.NamespaceRequired(ctx)
	if err != nil {
		return nil, fmt.Errorf("kiln task service: %w", err)
	}
	if threads == nil {
		if threads, err = standin.NewPool(); err != nil {
			return nil, fmt.Errorf("kiln task service: %w", err)
		}
	}
	s := &Service{
		ctx: ctx, namespace: ns, publisher: publisher, sd: sd, version: version,
		events:     make(chan any, eventQueue),
		loadConfig: config.Load,
		standIns:   threads,
	}
	go s.forward(ctx)
	sd.RegisterCallback(s.shutdown)
	return s, nil
}

// RegisterTTRPC serves the task API on the shim's ttrpc server, as version 3 and as version 2 (see taskV2Name).
func (s *Service) RegisterTTRPC(server *ttrpc.Server) error {
	taskAPI.RegisterTTRPCTaskService(server, s)
	registerTaskV2(server, s)
	return nil
}

// log is the shim log with the sandbox, container and exec fields.
func (s *Service) log(containerID, execID string) *logrus.Entry {
	l := log.G(s.ctx).WithField("container", containerID)
	if execID != "" {
		l = l.WithField("exec", execID)
	}
	if p := s.currentPod(); p != nil {
		l = l.WithField("sandbox", p.ID())
	}
	return l
}

func (s *Service) currentPod() *pod.Pod {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.pod
}

func (s *Service) getContainer(id string) (*container.Container, error) {
	p := s.currentPod()
	if p == nil {
		return nil, fmt.Errorf("task %s: %w", id, errdefs.ErrNotFound)
	}
	return p.Containers().Get(id)
}

func (s *Service) getProcess(id, execID string) (*container.Container, *container.Process, error) {
	c, err := s.getContainer(id)
	if err != nil {
		return nil, nil, err
	}
	p, err := c.Process(execID)
	if err != nil {
		return nil, nil, err
	}
	return c, p, nil
}

// VMID is the id of the pod that serves a shim group: short, because QEMU's sockets live under
// <state>/<vm id>/ and Unix socket paths are limited to 108 bytes; derived from namespace and group, so it is
// the same for every container of the group. A spare shim's pod (BootSpare) has a random id of the same form, so
// that `delete` cleans up after the task it is handed as after any other (Record.Validate).
func VMID(namespace, group string) string {
	sum := sha256.Sum256([]byte(namespace + "/" + group))
	return vmID(sum[:8])
}

// vmID is the VM id of 8 bytes: "kiln-" and their 16 hex digits (vmIDPattern).
func vmID(b []byte) string { return "kiln-" + hex.EncodeToString(b) }

// shimLogLevel is the level the shim logs at once a task names its configuration: runtime.log_level, raised to
// debug by agent.debug, or by containerd's own debug logging (current, as containerd's shim setup left it).
func shimLogLevel(cfg config.Config, current logrus.Level) logrus.Level {
	want, err := logrus.ParseLevel(cfg.Runtime.LogLevel)
	if err != nil { // config.Validate refuses such a level: keep containerd's
		return current
	}
	if cfg.Agent.Debug && want < logrus.DebugLevel {
		want = logrus.DebugLevel
	}
	if current >= logrus.DebugLevel && want < current {
		want = current
	}
	return want
}

// podFor returns the shim's pod, booting it with the configuration the request names when there is none.
func (s *Service) podFor(ctx context.Context, id string, b *bundle.Bundle, opts *anypb.Any) (*pod.Pod, error) {
	s.bootMu.Lock()
	defer s.bootMu.Unlock()
	if p := s.currentPod(); p != nil {
		return p, nil
	}
	s.mu.Lock()
	ending := s.ending
	s.mu.Unlock()
	if ending {
		// Before any hook ran: no poststop hook is owed.
		return nil, pod.Refuse(fmt.Errorf("%w: the shim is shutting down", errdefs.ErrUnavailable))
	}
	path, err := ConfigPath(opts)
	if err != nil {
		return nil, pod.Refuse(err)
	}
	cfg, err := s.loadConfig(path)
	if err != nil {
		return nil, pod.Refuse(fmt.Errorf("%w: load kiln configuration: %v", errdefs.ErrInvalidArgument, err))
	}
	l := log.G(s.ctx).WithField("container", id)
	l.Logger.SetLevel(shimLogLevel(cfg, l.Logger.GetLevel()))
	if _, err := pod.CheckSpec(cfg, id, b.Spec); err != nil {
		return nil, err
	}
	first := &pod.First{ID: id, Bundle: b}
	// Started now, before this shim enters the task's host cgroup, which the spare must not share. This task is
	// taken for a sign of the tasks to come: the spare's VM is of its shape.
	if cfg.Hypervisor.SpareOn() {
		if sized, err := pod.Size(cfg, first); err == nil {
			s.startSpare(path, sized, l)
		}
	}
	p, net, err := s.takeSpare(ctx, cfg, first, l)
	if err != nil {
		return nil, err
	}
	if p == nil {
		p, err = pod.New(ctx, pod.Options{
			ID: VMID(s.namespace, groupOf(id)), Config: cfg, HostVersion: s.version, Log: l,
			OnEvent: s.onEvent, OnExit: s.onExit, First: first, Network: net, StandIns: s.standIns,
		})
		if err != nil {
			return nil, err
		}
	}
	s.mu.Lock()
	ending = s.ending
	if !ending {
		s.pod = p
	}
	s.mu.Unlock()
	if ending {
		// The shim's stop (Shutdown with now set, a signal) began while the pod booted, and found none to stop.
		if err := p.Close(context.WithoutCancel(ctx)); err != nil {
			l.WithError(err).Warn("stop the pod of a shim shutting down")
		}
		return nil, fmt.Errorf("%w: the shim is shutting down", errdefs.ErrUnavailable)
	}
	return p, nil
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

// ConfigPath is the Kiln configuration containerd's runtime options name, or "" when there are none.
func ConfigPath(opts *anypb.Any) (string, error) {
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
	// containerd's CRI (2.4) starts a container with a user namespace with runc's options holding only the
	// owner of its stdio (IoUid, IoGid), whatever the runtime: for a runtime with no options of its own that is
	// all Kiln gets. Its stdio reaches the guest over vsock, not as host pipes the container opens, so the owner
	// has nothing to apply to; anything else set in runc's options is refused.
	if o, ok := v.(*runcoptions.Options); ok && proto.Equal(&runcoptions.Options{IoUid: o.IoUid, IoGid: o.IoGid}, o) {
		return "", nil
	}
	return "", fmt.Errorf("%w: runtime options of type %T: Kiln takes runtimeoptions.v1.Options (ConfigPath)", errdefs.ErrInvalidArgument, v)
}

// Create boots the pod if this is the group's first task and adds the container to it, its init process
// waiting to be started.
func (s *Service) Create(ctx context.Context, r *taskAPI.CreateTaskRequest) (*taskAPI.CreateTaskResponse, error) {
	resp, err := s.create(ctx, r)
	return resp, toGRPC(err)
}

func (s *Service) create(ctx context.Context, r *taskAPI.CreateTaskRequest) (_ *taskAPI.CreateTaskResponse, retErr error) {
	if r.Checkpoint != "" || r.ParentCheckpoint != "" {
		return nil, fmt.Errorf("create task %s from a checkpoint: %w", r.ID, errdefs.ErrNotImplemented)
	}
	if _, err := s.getContainer(r.ID); err == nil {
		return nil, fmt.Errorf("create task %s: %w", r.ID, errdefs.ErrAlreadyExists)
	}
	// Counted before anything that takes time (the bundle's load, holding spares): a Shutdown meanwhile would find
	// the shim idle and end it under the pod this Create boots.
	s.mu.Lock()
	s.creating++
	s.mu.Unlock()
	var held *spare.Held
	defer func() {
		s.mu.Lock()
		s.creating--
		if retErr == nil {
			// A task is there now: a Shutdown that came meanwhile is moot.
			s.shutdownAsked = false
		}
		if retErr == nil && held != nil {
			if s.creates == nil {
				s.creates = map[string]*spare.Held{}
			}
			s.creates[r.ID] = held
			held = nil
		}
		s.mu.Unlock()
		held.Release()
		if retErr != nil {
			s.shutdownIfAsked(context.WithoutCancel(ctx))
		}
	}()
	b, err := bundle.Load(r.Bundle)
	if err != nil {
		return nil, fmt.Errorf("create task %s: %w", r.ID, err)
	}
	held = s.holdSpares(ctx)
	p, err := s.podFor(ctx, r.ID, b, r.Options)
	if err != nil {
		err = fmt.Errorf("create task %s: %w", r.ID, err)
		s.failedCreate(ctx, nil, r.ID, b, err)
		return nil, err
	}
	defer func() {
		if retErr != nil {
			s.failedCreate(ctx, p, r.ID, b, retErr)
			s.stopIfIdle(ctx)
		}
	}()
	spec := ioSpec{Stdin: r.Stdin, Stdout: r.Stdout, Stderr: r.Stderr, Terminal: r.Terminal}
	pio, err := openIO(ctx, r.ID, s.namespace, spec)
	if err != nil {
		return nil, fmt.Errorf("create task %s: %w", r.ID, err)
	}
	rootfs := make([]pod.Mount, 0, len(r.Rootfs))
	for _, m := range r.Rootfs {
		rootfs = append(rootfs, pod.Mount{Type: m.Type, Source: m.Source, Options: m.Options})
	}
	if !s.unannounce(r.ID) {
		_ = pio.Close()
		// Refused: the poststop hooks are the other Create's to run.
		return nil, pod.Refuse(fmt.Errorf("create task %s: %w: another create of it is under way", r.ID, errdefs.ErrAlreadyExists))
	}
	c, err := p.CreateContainer(ctx, pod.ContainerOptions{ID: r.ID, Bundle: b, Rootfs: rootfs, IO: pio.streams, Release: pio})
	if err != nil {
		s.dropUnannounced(r.ID)
		_ = pio.Close()
		return nil, err
	}
	pio.holdStdin()
	pid := c.HostPid()
	// The state dir clean, as Record.Validate wants it (the configuration only asks for an absolute path).
	rec := Record{VMID: p.ID(), StateDir: filepath.Clean(p.StateDir()), ShareDir: p.ShareDir(), ShimPid: os.Getpid(), ShimSocket: s.socket, Pid: pid, Cgroup: p.CgroupPath()}
	if err := WriteRecord(r.Bundle, rec); err != nil {
		s.log(r.ID, "").WithError(err).Warn("record task for cleanup after a shim crash")
	}
	s.announce(r.ID, &eventstypes.TaskCreate{
		ContainerID: r.ID,
		Bundle:      r.Bundle,
		Rootfs:      r.Rootfs,
		IO:          &eventstypes.TaskIO{Stdin: r.Stdin, Stdout: r.Stdout, Stderr: r.Stderr, Terminal: r.Terminal},
		Checkpoint:  r.Checkpoint,
		Pid:         pid,
	})
	return &taskAPI.CreateTaskResponse{Pid: pid}, nil
}

// failedCreate runs the poststop hooks of a task whose create failed (pod.FailedCreate); a failing hook is
// logged, as the runtime spec asks.
func (s *Service) failedCreate(ctx context.Context, p *pod.Pod, id string, b *bundle.Bundle, err error) {
	if err := pod.FailedCreate(context.WithoutCancel(ctx), p, id, b, err); err != nil {
		s.log(id, "").WithError(err).Warn("poststop hook failed")
	}
}

// Start runs a created task's init process, or an exec process added with Exec. The start event is queued
// before any exit of the process can be.
func (s *Service) Start(ctx context.Context, r *taskAPI.StartRequest) (*taskAPI.StartResponse, error) {
	c, p, err := s.getProcess(r.ID, r.ExecID)
	if err != nil {
		return nil, toGRPC(err)
	}
	if r.ExecID == "" {
		// What the container's create held waits until it has started, or failed to.
		defer s.letGo(c.ID(), "", s.createHolds(c.ID()))
		if pd := s.currentPod(); pd != nil {
			if err := pd.CheckLateNetwork(c.ID()); err != nil {
				return nil, toGRPC(err)
			}
		}
	} else {
		// An exec's start is where its cost is (the guest's runc exec), and a probe's round trip with it: the
		// spares booting meanwhile wait, as for a container's create and start.
		defer s.letGo(r.ID, r.ExecID, s.holdSpares(ctx))
	}
	err = p.Start(ctx, func() {
		if r.ExecID == "" {
			s.send(&eventstypes.TaskStart{ContainerID: c.ID(), Pid: c.HostPid()})
		} else {
			s.send(&eventstypes.TaskExecStarted{ContainerID: c.ID(), ExecID: r.ExecID, Pid: c.HostPid()})
		}
	})
	if err != nil {
		return nil, toGRPC(err)
	}
	if pio := ioOf(p); pio != nil && r.ExecID != "" {
		pio.holdStdin()
	}
	if r.ExecID == "" {
		var hookErr error
		if pd := s.currentPod(); pd != nil {
			hookErr = pd.Started(ctx, c)
			// A pod's start is over with its first container of its own, not with its sandbox (CRI's pause).
			if !pd.IsSandbox(c.ID()) {
				if n := s.held.Release(); n > 0 {
					s.log(c.ID(), "").WithField("spares", n).Info("the task started; the booting spares it held go on")
				}
			}
		}
		s.releaseSpare()
		if hookErr != nil {
			return nil, toGRPC(hookErr)
		}
	}
	return &taskAPI.StartResponse{Pid: c.HostPid()}, nil
}

// Exec adds an exec process to a running task; Start runs it.
func (s *Service) Exec(ctx context.Context, r *taskAPI.ExecProcessRequest) (*emptyResp, error) {
	c, err := s.getContainer(r.ID)
	if err != nil {
		return nil, toGRPC(err)
	}
	if r.Spec == nil {
		return nil, toGRPC(fmt.Errorf("%w: exec %s in task %s: no process spec", errdefs.ErrInvalidArgument, r.ExecID, r.ID))
	}
	var spec specs.Process
	if err := json.Unmarshal(r.Spec.GetValue(), &spec); err != nil {
		return nil, toGRPC(fmt.Errorf("%w: exec %s in task %s: decode process spec: %v", errdefs.ErrInvalidArgument, r.ExecID, r.ID, err))
	}
	if err := pod.CheckProcess(&spec); err != nil {
		return nil, toGRPC(fmt.Errorf("exec %s in task %s: %w", r.ExecID, r.ID, err))
	}
	if p := s.currentPod(); p != nil {
		fields, err := hostlsm.Process(p.Config().Runtime.IgnoreHostLSM(), &spec)
		if err != nil {
			return nil, toGRPC(fmt.Errorf("exec %s in task %s: %w", r.ExecID, r.ID, err))
		}
		if len(fields) > 0 {
			log.G(ctx).WithFields(logrus.Fields{"exec": r.ExecID, "ignored": fields}).Info("host LSM settings taken out (runtime.host_lsm = \"ignore\")")
		}
	}
	pio, err := openIO(ctx, r.ID, s.namespace, ioSpec{Stdin: r.Stdin, Stdout: r.Stdout, Stderr: r.Stderr, Terminal: r.Terminal})
	if err != nil {
		return nil, toGRPC(fmt.Errorf("exec %s in task %s: %w", r.ExecID, r.ID, err))
	}
	if _, err := c.AddExec(r.ExecID, &spec, pio.streams, pio); err != nil {
		_ = pio.Close()
		return nil, toGRPC(err)
	}
	s.send(&eventstypes.TaskExecAdded{ContainerID: r.ID, ExecID: r.ExecID})
	return empty(), nil
}
