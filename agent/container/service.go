package container

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"syscall"
	"time"

	"github.com/opencontainers/runc/libcontainer"
	"github.com/opencontainers/runc/libcontainer/configs"
	"github.com/sirupsen/logrus"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/kiln-runtime/kiln/agent"
	"github.com/kiln-runtime/kiln/agent/stdio"
	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
	"github.com/kiln-runtime/kiln/proto/lifecycle"
)

// Default places and bounds of the service.
const (
	DefaultStateDir     = "/run/kiln/containers"
	DefaultSharedDir    = agentv1.GuestSharedDir
	DefaultStdioTimeout = 10 * time.Second
	// removeKillTimeout bounds the wait for a force-removed container's
	// processes to die.
	removeKillTimeout = 10 * time.Second
	// maxStoppedExecs bounds the stopped exec processes a container keeps
	// for WaitProcess: probes exec every few seconds for the container's
	// whole life, and the API has no call to forget one.
	maxStoppedExecs = 128
)

// ChildReaper is the guest's orphan reaper as the service needs it.
// libcontainer starts children and waits for some of them itself, and the
// service waits for the container processes; a reaper that collected any
// child would steal those exit statuses.
type ChildReaper interface {
	// Hold stops reaping until release is called; it is held around each
	// libcontainer call that starts processes.
	Hold() (release func())
	// Claim leaves pid to the service until release, which is called once
	// the service has collected its exit status.
	Claim(pid int) (release func())
}

// Config is what the service needs from the agent.
type Config struct {
	// StateDir holds libcontainer's state (a tmpfs in the guest).
	StateDir string
	// SharedDir is where the host's shared directory is mounted; requests'
	// rootfs paths are relative to it.
	SharedDir string
	// RootsDir is where read-only roots are layered (readOnlyRoot).
	RootsDir string
	// Stdio holds the host's stdio connections until requests claim them.
	Stdio *stdio.Hub
	// Reaper coordinates exit statuses with the guest's orphan reaper.
	Reaper ChildReaper
	// StdioTimeout bounds a request's wait for its stdio connections.
	StdioTimeout time.Duration
	// EventBacklog bounds the events kept while no subscriber listens.
	EventBacklog int
	// NoPivotRoot makes containers use chroot instead of pivot_root(2),
	// which fails while the guest's root is the initial ramfs (the agent
	// leaves it at boot: agent.LeaveInitramfs). New detects it when nil.
	NoPivotRoot *bool
	// PodNetNS is the pod's network namespace, which every container joins.
	PodNetNS PodNetNS
}

// PodNetNS is the pod's network namespace in the guest (agent/network).
type PodNetNS interface {
	// Path is the namespace's file, created on first use.
	Path() (string, error)
	// SetSysctls writes net.* sysctls in the namespace.
	SetSysctls(values map[string]string) error
	// Sysfs is a sysfs mounted from inside the namespace, for containers that cannot mount one there.
	Sysfs() (string, error)
}

// Service implements the Containers API.
type Service struct {
	cfg     Config
	log     *logrus.Entry
	events  *eventQueue
	noPivot bool

	mu         sync.Mutex
	containers map[string]*container
	creating   map[string]bool

	shared sharedMounts
	// entries drops the guest's unused file system entries after removals (forgetRemoved).
	entries entryDropper
}

var _ agentv1.ContainersService = (*Service)(nil)

// New returns a service with no containers.
func New(log *logrus.Entry, cfg Config) (*Service, error) {
	if cfg.StateDir == "" {
		cfg.StateDir = DefaultStateDir
	}
	if cfg.SharedDir == "" {
		cfg.SharedDir = DefaultSharedDir
	}
	if cfg.RootsDir == "" {
		cfg.RootsDir = DefaultRootsDir
	}
	if cfg.StdioTimeout <= 0 {
		cfg.StdioTimeout = DefaultStdioTimeout
	}
	if cfg.Stdio == nil || cfg.Reaper == nil || cfg.PodNetNS == nil {
		return nil, errors.New("container service needs a stdio hub, a reaper and the pod's network namespace")
	}
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("create container state directory %s: %w", cfg.StateDir, err)
	}
	s := &Service{
		cfg:        cfg,
		log:        log,
		events:     newEventQueue(cfg.EventBacklog),
		containers: map[string]*container{},
		creating:   map[string]bool{},
		entries:    entryDropper{write: writeDropCaches},
	}
	if cfg.NoPivotRoot != nil {
		s.noPivot = *cfg.NoPivotRoot
	} else {
		pivotable, err := agent.RootCanPivot()
		if err != nil {
			return nil, err
		}
		s.noPivot = !pivotable
	}
	return s, nil
}

// runtimeContainer is what the service asks of a libcontainer container (*libcontainer.Container). Fuzz tests
// of the handlers give containers one that runs nothing on the test's host.
type runtimeContainer interface {
	Start(*libcontainer.Process) error
	Exec() error
	Signal(os.Signal) error
	Processes() ([]int, error)
	Pause() error
	Resume() error
	Config() configs.Config
	Set(configs.Config) error
	Destroy() error
}

// container is one libcontainer container and its processes.
type container struct {
	id        string
	lc        runtimeContainer
	rootfs    string // in the shared directory
	cgroupDir string
	oom       *oomWatcher
	// readOnly layers rootfs when the spec asks for a read-only root; nil otherwise.
	readOnly *readOnlyRoot
	// sources are its bind sources in the shared directory, whose mounts it holds (sharedMounts).
	sources []string
	// updateMu serialises UpdateContainer's read, merge and set of the resources.
	updateMu sync.Mutex

	mu           sync.Mutex
	init         *process
	execs        map[string]*process
	stoppedExecs []string // oldest first
}

// process is a container's init or exec process.
type process struct {
	execID string
	lp     *libcontainer.Process
	pid    int
	io     *processIO
	sm     *lifecycle.Machine // guarded by the container's mu
	done   chan struct{}
	// Set before done is closed.
	exitStatus uint32
	exitedAt   time.Time
}

func (s *Service) get(id string) (*container, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	c := s.containers[id]
	if c == nil {
		return nil, status.Errorf(codes.NotFound, "container %q not found", id)
	}
	return c, nil
}

// isInitPid says whether pid is the init process of a container of the pod that has not exited.
func (s *Service) isInitPid(pid int) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, c := range s.containers {
		c.mu.Lock()
		p := c.init
		c.mu.Unlock()
		if p != nil && p.pid == pid {
			select {
			case <-p.done:
			default:
				return true
			}
		}
	}
	return false
}

// process finds a process by exec id ("" is the init process).
func (c *container) process(execID string) (*process, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if execID == "" {
		return c.init, nil
	}
	p := c.execs[execID]
	if p == nil {
		return nil, status.Errorf(codes.NotFound, "exec %q of container %q not found", execID, c.id)
	}
	return p, nil
}

func transitionErr(what, id string, err error) error {
	return status.Errorf(codes.FailedPrecondition, "%s %s: %v", what, id, err)
}

// claimStdio waits (bounded) for the connections a request names.
func (s *Service) claimStdio(ctx context.Context, st *agentv1.Stdio) (map[stdio.Stream]net.Conn, error) {
	ctx, cancel := context.WithTimeout(ctx, s.cfg.StdioTimeout)
	defer cancel()
	conns, err := s.cfg.Stdio.Claim(ctx, st.GetStdioKey(), wantedStreams(st))
	if err != nil {
		return nil, status.Errorf(codes.DeadlineExceeded, "%v", err)
	}
	return conns, nil
}

// start runs lp in lc with the reaper held, so that the children
// libcontainer waits for itself are not reaped from under it, and claims
// the process before the reaper may look again.
func (s *Service) start(lc runtimeContainer, lp *libcontainer.Process) (pid int, unclaim func(), err error) {
	release := s.cfg.Reaper.Hold()
	defer release()
	if err := lc.Start(lp); err != nil {
		return 0, nil, err
	}
	pid, err = lp.Pid()
	if err != nil {
		return 0, nil, fmt.Errorf("pid of started process: %w", err)
	}
	return pid, s.cfg.Reaper.Claim(pid), nil
}

// watch waits for p's exit, delivers its output, then reports the exit.
func (s *Service) watch(c *container, p *process, unclaim func()) {
	ps, err := p.lp.Wait()
	unclaim()
	exitedAt := time.Now()
	code := exitCode(ps, err)
	log := s.log.WithFields(logrus.Fields{"container": c.id, "exec": p.execID, "pid": p.pid, "status": code})
	if ps == nil {
		log.WithError(err).Warn("wait for container process")
	}
	p.io.finish()
	if p.execID == "" && c.oom != nil {
		c.oom.check()
	}
	c.mu.Lock()
	p.exitStatus, p.exitedAt = code, exitedAt
	if err := p.sm.Transition(lifecycle.Stopped); err != nil {
		log.WithError(err).Warn("process exit in an unexpected state")
	}
	if p.execID != "" {
		c.noteStoppedExec(p.execID)
	}
	c.mu.Unlock()
	s.events.publish(&agentv1.Event{Event: &agentv1.Event_Exit{Exit: &agentv1.ExitEvent{
		ContainerId: c.id,
		ExecId:      p.execID,
		Pid:         uint32(p.pid),
		ExitStatus:  code,
		ExitedAt:    timestamppb.New(exitedAt),
	}}})
	close(p.done)
	log.Debug("process exited")
}

// noteStoppedExec forgets the oldest stopped execs beyond the bound.
// c.mu is held.
func (c *container) noteStoppedExec(execID string) {
	c.stoppedExecs = append(c.stoppedExecs, execID)
	for len(c.stoppedExecs) > maxStoppedExecs {
		old := c.stoppedExecs[0]
		c.stoppedExecs = c.stoppedExecs[1:]
		if p := c.execs[old]; p != nil && p.sm.State() == lifecycle.Stopped {
			delete(c.execs, old)
		}
	}
}

// exitCode is the shell's convention: the exit code, or 128+signal.
func exitCode(ps *os.ProcessState, err error) uint32 {
	if ps == nil {
		return 255
	}
	ws, ok := ps.Sys().(syscall.WaitStatus)
	if !ok {
		return uint32(ps.ExitCode())
	}
	if ws.Signaled() {
		return 128 + uint32(ws.Signal())
	}
	return uint32(ws.ExitStatus())
}
