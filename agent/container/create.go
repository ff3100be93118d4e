package container

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/opencontainers/runc/libcontainer"
	"github.com/opencontainers/runc/libcontainer/configs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
	"github.com/kiln-runtime/kiln/proto/lifecycle"
)

// creation is a CreateContainerRequest checked and converted, before anything is created.
type creation struct {
	id     string
	root   string
	config *configs.Config
	lp     *libcontainer.Process
	// netSysctls are net.* sysctls the agent writes in the pod namespace for the container (fitUserNamespace).
	netSysctls map[string]string
	// sources are the container's bind sources in the shared directory (sharedMounts).
	sources []string
	// readOnly layers the root when the spec asks for a read-only one; nil otherwise.
	readOnly *readOnlyRoot
}

// prepareCreate checks a request and converts its spec and process for libcontainer; it creates nothing but the
// pod's network namespace, which every container joins.
func (s *Service) prepareCreate(req *agentv1.CreateContainerRequest) (*creation, error) {
	id := req.GetContainerId()
	if id == "" {
		return nil, status.Error(codes.InvalidArgument, "create container: empty container id")
	}
	root, err := rootfsPath(s.cfg.SharedDir, req.GetRootfs())
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "create container %s: %v", id, err)
	}
	podNet, err := s.cfg.PodNetNS.Path()
	if err != nil {
		return nil, fmt.Errorf("create container %s: %w", id, err)
	}
	spec, err := adaptSpec(req.GetOciSpec(), id, root, podNamespaces{net: podNet, isInit: s.isInitPid})
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "create container %s: %v", id, err)
	}
	var readOnly *readOnlyRoot
	if spec.Root.Readonly {
		if readOnly, err = newReadOnlyRoot(s.cfg.RootsDir, id, root); err != nil {
			return nil, status.Errorf(codes.InvalidArgument, "create container %s: %v", id, err)
		}
		spec.Root.Path = readOnly.root()
	}
	dropped, err := fitDevices(spec.Linux, guestDevice)
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "create container %s: %v", id, err)
	}
	if len(dropped) > 0 {
		s.log.WithFields(logrus.Fields{"container": id, "devices": dropped}).Info("a privileged container's host devices the VM does not have are left out")
	}
	netSysctls, err := fitUserNamespace(spec, s.cfg.PodNetNS.Sysfs)
	if err != nil {
		return nil, fmt.Errorf("create container %s: %w", id, err)
	}
	config, err := libcontainerConfig(spec, id, s.noPivot)
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "create container %s: %v", id, err)
	}
	lp, err := newProcess(spec.Process, root)
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "create container %s: %v", id, err)
	}
	lp.Init = true
	if spec.Process.Terminal != req.GetStdio().GetTerminal() {
		s.log.WithFields(logrus.Fields{"container": id, "spec_terminal": spec.Process.Terminal}).
			Warn("request's stdio decides the terminal, not the spec")
	}
	return &creation{
		id: id, root: root, config: config, lp: lp, netSysctls: netSysctls, sources: sharedSources(spec, s.cfg.SharedDir),
		readOnly: readOnly,
	}, nil
}

// CreateContainer builds the container and its init process, which waits
// for StartContainer before it runs the user's program.
func (s *Service) CreateContainer(ctx context.Context, req *agentv1.CreateContainerRequest) (_ *agentv1.CreateContainerResponse, retErr error) {
	// The pod binds this create released on failing, for forgetFailedCreate.
	var released []string
	defer func() {
		if retErr != nil && status.Code(retErr) != codes.AlreadyExists {
			s.forgetFailedCreate(req, released)
		}
	}()
	cr, err := s.prepareCreate(req)
	if err != nil {
		return nil, err
	}
	id, root, config, lp := cr.id, cr.root, cr.config, cr.lp
	log := s.log.WithField("container", id)

	if err := s.reserve(id); err != nil {
		return nil, err
	}
	s.shared.acquire(log, cr.sources)
	defer func() {
		if retErr != nil {
			released = s.shared.release(log, cr.sources)
			s.unreserve(id)
		}
	}()
	if cr.readOnly != nil {
		if err := cr.readOnly.mount(); err != nil {
			return nil, fmt.Errorf("create container %s: %w", id, err)
		}
		defer func() {
			if retErr != nil {
				if err := cr.readOnly.remove(); err != nil {
					log.WithError(err).Warn("remove the read-only root of a container not created")
				}
			}
		}()
	}
	conns, err := s.claimStdio(ctx, req.GetStdio())
	if err != nil {
		return nil, fmt.Errorf("create container %s: %w", id, err)
	}
	pio, err := newProcessIO(log, req.GetStdio(), conns, lp)
	if err != nil {
		return nil, fmt.Errorf("create container %s: %w", id, err)
	}
	if err := s.cfg.PodNetNS.SetSysctls(cr.netSysctls); err != nil {
		pio.abort()
		return nil, fmt.Errorf("create container %s: %w", id, err)
	}
	lc, err := libcontainer.Create(s.cfg.StateDir, id, config)
	if err != nil {
		pio.abort()
		return nil, fmt.Errorf("create container %s: %w", id, err)
	}
	pid, unclaim, err := s.start(lc, lp)
	if err != nil {
		pio.abort()
		if derr := lc.Destroy(); derr != nil {
			log.WithError(derr).Warn("destroy container that failed to start")
		}
		return nil, fmt.Errorf("create container %s: start init: %w", id, err)
	}
	c := &container{id: id, lc: lc, rootfs: root, readOnly: cr.readOnly, sources: cr.sources, execs: map[string]*process{}}
	p := &process{lp: lp, pid: pid, io: pio, sm: lifecycle.New(lifecycle.Init()), done: make(chan struct{})}
	c.init = p
	if err := errors.Join(pio.started(), unwaited(ctx)); err != nil {
		killUnwanted(log, lp, unclaim)
		pio.abort()
		_ = lc.Destroy()
		return nil, fmt.Errorf("create container %s: %w", id, err)
	}
	if state, err := lc.State(); err == nil {
		c.cgroupDir = state.CgroupPaths[""]
	}
	if c.cgroupDir != "" {
		oom, err := watchOOM(c.cgroupDir, func() { s.publishOOM(id) })
		if err != nil {
			log.WithError(err).Warn("OOM kills of this container will not be reported")
		}
		c.oom = oom
	}
	s.mu.Lock()
	delete(s.creating, id)
	s.containers[id] = c
	s.mu.Unlock()
	go s.watch(c, p, unclaim)
	log.WithField("pid", pid).Info("container created")
	return &agentv1.CreateContainerResponse{Pid: uint32(pid)}, nil
}

// forgetFailedCreate has the guest's kernel forget, once the host removed them, the container's directory and the
// pod binds released (removedPaths) after a create that failed: it may have looked up files there (the user's
// database, the executable's path, libcontainer's mount points), which virtiofsd holds with the container's root
// until the guest forgets them, and kubelet creates a container that fails so again under a new id after each
// back-off.
func (s *Service) forgetFailedCreate(req *agentv1.CreateContainerRequest, released []string) {
	root, err := rootfsPath(s.cfg.SharedDir, req.GetRootfs())
	if err != nil {
		return // nothing of it was looked up
	}
	s.forget(s.log.WithField("container", req.GetContainerId()), root, released)
}

func (s *Service) publishOOM(id string) {
	s.log.WithField("container", id).Info("OOM kill in container")
	s.events.publish(&agentv1.Event{Event: &agentv1.Event_Oom{Oom: &agentv1.OOMEvent{ContainerId: id}}})
}

// killUnwanted ends a process the service could not finish setting up.
func killUnwanted(log *logrus.Entry, lp *libcontainer.Process, unclaim func()) {
	if err := lp.Signal(unix.SIGKILL); err != nil {
		log.WithError(err).Warn("kill process that failed to set up")
	}
	_, _ = lp.Wait()
	unclaim()
}

func (s *Service) reserve(id string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.containers[id] != nil || s.creating[id] {
		return status.Errorf(codes.AlreadyExists, "container %q already exists", id)
	}
	s.creating[id] = true
	return nil
}

func (s *Service) unreserve(id string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.creating, id)
}

// StartContainer lets the init process run the user's program.
func (s *Service) StartContainer(ctx context.Context, req *agentv1.StartContainerRequest) (*agentv1.StartContainerResponse, error) {
	c, err := s.get(req.GetContainerId())
	if err != nil {
		return nil, err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.init.sm.Can(lifecycle.Running) {
		return nil, transitionErr("start container", c.id, &lifecycle.TransitionError{From: c.init.sm.State(), To: lifecycle.Running})
	}
	if err := c.lc.Exec(); err != nil {
		return nil, fmt.Errorf("start container %s: %w", c.id, err)
	}
	if err := c.init.sm.Transition(lifecycle.Running); err != nil {
		return nil, transitionErr("start container", c.id, err)
	}
	return &agentv1.StartContainerResponse{}, nil
}

// ExecProcess starts another process in a running container.
func (s *Service) ExecProcess(ctx context.Context, req *agentv1.ExecProcessRequest) (_ *agentv1.ExecProcessResponse, retErr error) {
	c, err := s.get(req.GetContainerId())
	if err != nil {
		return nil, err
	}
	execID := req.GetExecId()
	if execID == "" {
		return nil, status.Errorf(codes.InvalidArgument, "exec in container %s: empty exec id", c.id)
	}
	var spec specs.Process
	if err := json.Unmarshal(req.GetProcess(), &spec); err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "exec %s in container %s: parse process: %v", execID, c.id, err)
	}
	lp, err := newProcess(&spec, c.rootfs)
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "exec %s in container %s: %v", execID, c.id, err)
	}
	log := s.log.WithFields(logrus.Fields{"container": c.id, "exec": execID})

	p := &process{execID: execID, lp: lp, sm: lifecycle.New(lifecycle.Exec()), done: make(chan struct{})}
	if err := c.reserveExec(p); err != nil {
		return nil, err
	}
	defer func() {
		if retErr != nil {
			c.mu.Lock()
			delete(c.execs, execID)
			c.mu.Unlock()
		}
	}()
	conns, err := s.claimStdio(ctx, req.GetStdio())
	if err != nil {
		return nil, fmt.Errorf("exec %s in container %s: %w", execID, c.id, err)
	}
	pio, err := newProcessIO(log, req.GetStdio(), conns, lp)
	if err != nil {
		return nil, fmt.Errorf("exec %s in container %s: %w", execID, c.id, err)
	}
	pid, unclaim, err := s.start(c.lc, lp)
	if err != nil {
		pio.abort()
		return nil, fmt.Errorf("exec %s in container %s: %w", execID, c.id, err)
	}
	if err := errors.Join(pio.started(), unwaited(ctx)); err != nil {
		killUnwanted(log, lp, unclaim)
		pio.abort()
		return nil, fmt.Errorf("exec %s in container %s: %w", execID, c.id, err)
	}
	c.mu.Lock()
	p.pid, p.io = pid, pio
	err = p.sm.Transition(lifecycle.Running)
	c.mu.Unlock()
	if err != nil {
		log.WithError(err).Warn("exec started in an unexpected state")
	}
	go s.watch(c, p, unclaim)
	return &agentv1.ExecProcessResponse{Pid: uint32(pid)}, nil
}

// reserveExec enters p under its exec id; a stopped exec of the same id
// gives way, as after containerd deleted it.
func (c *container) reserveExec(p *process) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if st := c.init.sm.State(); st != lifecycle.Running {
		return status.Errorf(codes.FailedPrecondition, "exec %s in container %s: container is %s", p.execID, c.id, st)
	}
	if old := c.execs[p.execID]; old != nil && old.sm.State() != lifecycle.Stopped {
		return status.Errorf(codes.AlreadyExists, "exec %q already exists in container %s", p.execID, c.id)
	}
	c.execs[p.execID] = p
	return nil
}

// unwaited is the error of a request whose caller stopped waiting (its deadline, which ttrpc carries over, passed)
// before the process it asked for was started: the host forgets such a container or exec, so it is taken back
// here rather than kept with no one to wait for it or kill it. (The host also takes back what it gave up on, but
// a removal that comes while the create is still under way finds nothing.)
func unwaited(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("the host stopped waiting: %w", err)
	}
	return nil
}
