// Package container is the host's one registry of the containers and processes of one pod: it drives the
// guest agent's Containers API (create, start, exec, signal, pause, update, stats, delete), attaches each
// process's stdio through runtime/stdio, follows the agent's Events stream to learn of exits and OOM kills, and
// keeps every process's state with the lifecycle table the agent uses too (proto/lifecycle). A process stops
// through one path (finish), whatever told the host it ended: an exit event, a direct wait, its deletion or the
// end of the agent connection. It knows nothing of containerd, of the VMM, or of how a rootfs reached the guest:
// callers pass a guest rootfs path and a spec whose host paths are already rewritten.
package container

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"sync"
	"time"

	"github.com/containerd/ttrpc"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/sirupsen/logrus"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
	"github.com/kiln-runtime/kiln/proto/lifecycle"
	"github.com/kiln-runtime/kiln/runtime/stdio"
	"github.com/kiln-runtime/kiln/vm"
)

// Errors callers can test for with errors.Is.
var (
	ErrNotFound      = errors.New("not found")
	ErrAlreadyExists = errors.New("already exists")
	// ErrInvalidArgument is a request that can never succeed as made (an empty id, no process).
	ErrInvalidArgument = errors.New("invalid argument")
	// ErrInvalidState is a request the process's state does not allow (see proto/lifecycle).
	ErrInvalidState = lifecycle.ErrInvalidState
	// ErrClosed ends the waits of processes whose exit was not seen before the manager closed or the agent
	// connection ended.
	ErrClosed = errors.New("container manager closed")
	// ErrDeleted ends the waits of processes whose container was deleted before their exit was seen.
	ErrDeleted = errors.New("deleted before its exit was seen")
)

// Options tune a Manager.
type Options struct {
	// DrainTimeout bounds how long, after an exit, the output the guest already sent is waited for. Default 30 s.
	DrainTimeout time.Duration
	// Events, when set, is the client the Events stream is opened on (sandbox.StreamClient), so that the stream
	// has a connection of its own; otherwise the stream shares the request client.
	Events agentv1.ContainersClient
	// OnEvent, when set, sees every OOM event of a container this manager holds and the first exit event of each
	// process it holds, in order, from the event loop's goroutine: it must not block. (An exit that came before the
	// guest said the process's pid is settled by the process's start instead, and not seen here.)
	OnEvent func(Event)
	// OnExit, when set, is called once for each process that exited, after its output was delivered and after
	// the callback of a Start in progress returned: an exit is never reported before its start. It is not
	// called for processes deleted or cut off before their exit was seen.
	OnExit func(*Process, Exit)
	// Abandon, when set, ends a guest whose agent did not answer a SIGKILL or a container's removal within
	// the request timeout, whether or not the caller still waited, or whose process outlived a SIGKILL: the
	// caller stops the VM. The manager first reports every process killed (Lost), so the kill or removal that
	// timed out succeeds without the agent.
	Abandon func(reason error)
	// KillGrace is how long a process the agent delivered SIGKILL to has to exit before the agent is asked for its
	// exit directly, and then how long that has to answer, before the guest is given up (watchKill). Default 30 s.
	KillGrace time.Duration
	// Rlimits are the resource limits an exec process gets for those its spec does not name (rlimit.Fill).
	Rlimits []specs.POSIXRlimit
	Log     *logrus.Entry

	// lostGrace is how long, after the events stream's connection closed, the caller has to report why with Lost
	// before the manager gives the guest up itself; lostGraceDefault but in tests.
	lostGrace time.Duration
}

// lostGraceDefault outlasts the pod's wait for its VM's exit after the agent connection ends (runtime/pod's
// vmExitAfterHangup, 2 s), after which the pod calls Lost itself.
const lostGraceDefault = 3 * time.Second

// Manager holds the containers of one pod and the exit reservation of each of their processes.
type Manager struct {
	api    agentv1.ContainersClient
	dialer stdio.Dialer
	opts   Options
	log    *logrus.Entry

	ctx      context.Context
	cancel   context.CancelFunc
	loopDone chan struct{}

	mu         sync.Mutex
	containers map[string]*Container
	// procs are the processes whose exit the host waits for, by container and exec id: registered before the
	// request that starts them, so no exit can arrive unclaimed.
	procs  map[exitKey]*Process
	closed bool
	// lost is why the guest is gone (the VM died): nothing more will come from the agent.
	lost error
	// noEvents is set when the agent has no events stream; each process's exit is then waited for directly.
	noEvents bool
	// waiting are the processes whose exit a WaitProcess call asks for now: one at a time each, however often
	// the events stream breaks (a guest can break it at will).
	waiting map[exitKey]bool
}

type exitKey struct{ container, exec string }

// NewManager starts following the agent's events. api is the agent's container API (sandbox.Containers), dialer
// reaches the guest's stdio port (the sandbox's machine). Close releases it.
func NewManager(api agentv1.ContainersClient, dialer stdio.Dialer, opts Options) *Manager {
	if opts.DrainTimeout <= 0 {
		opts.DrainTimeout = 30 * time.Second
	}
	if opts.Log == nil {
		opts.Log = logrus.NewEntry(logrus.StandardLogger())
	}
	if opts.lostGrace <= 0 {
		opts.lostGrace = lostGraceDefault
	}
	if opts.KillGrace <= 0 {
		opts.KillGrace = killGraceDefault
	}
	ctx, cancel := context.WithCancel(context.Background())
	m := &Manager{
		api: api, dialer: dialer, opts: opts, log: opts.Log,
		ctx: ctx, cancel: cancel, loopDone: make(chan struct{}),
		containers: map[string]*Container{}, procs: map[exitKey]*Process{}, waiting: map[exitKey]bool{},
	}
	go m.followEvents()
	return m
}

// Close stops following events and ends every process whose exit was not seen with ErrClosed. It does not
// touch the guest's containers: stopping the sandbox ends them.
func (m *Manager) Close() error {
	m.mu.Lock()
	m.closed = true
	m.mu.Unlock()
	m.cancel()
	<-m.loopDone
	m.endAll(ErrClosed)
	return nil
}

// Lost tells the manager that the guest is gone (its VM died): every process still running is reported exited
// with SIGKILL's status through OnExit, so waiters return and the caller publishes the exits, and deleting a
// container no longer asks the agent. reason goes to the log.
func (m *Manager) Lost(reason error) {
	m.mu.Lock()
	if m.closed || m.lost != nil {
		m.mu.Unlock()
		return
	}
	m.lost = reason
	m.mu.Unlock()
	m.log.WithError(reason).Error("guest lost; every process of the pod is reported killed (exit status 137)")
	if errors.Is(reason, vm.ErrOOMKilled) {
		m.reportOOMKilled()
	}
	m.endAll(nil)
}

// reportOOMKilled passes on an OOM kill of each container whose init process still runs, before their exits: the
// host's OOM killer ended the VM they ran in, as it would have ended runc's processes (kubelet then says
// OOMKilled, not Error).
func (m *Manager) reportOOMKilled() {
	if m.opts.OnEvent == nil {
		return
	}
	m.mu.Lock()
	var inits []*Process
	for k, p := range m.procs {
		if k.exec == "" {
			inits = append(inits, p)
		}
	}
	m.mu.Unlock()
	var ids []string
	for _, p := range inits {
		if st := p.State(); st == lifecycle.Created || st == lifecycle.Running {
			ids = append(ids, p.Container().ID())
		}
	}
	slices.Sort(ids)
	for _, id := range ids {
		m.opts.OnEvent(Event{Kind: EventOOM, ContainerID: id})
	}
}

// giveUp ends the guest: every process is reported killed (Lost) and its VM stopped (Options.Abandon).
func (m *Manager) giveUp(reason error) {
	m.Lost(reason)
	if m.opts.Abandon != nil {
		m.opts.Abandon(reason)
	}
}

// why adds to an agent request's error what became of the guest, when the request failed because it is gone:
// "ttrpc: closed" alone does not tell a user that the pod's VM died.
func (m *Manager) why(err error) error {
	if lost := m.guestLost(); lost != nil {
		return fmt.Errorf("%w (the pod's guest is gone: %v)", err, lost)
	}
	if errors.Is(err, ttrpc.ErrClosed) {
		return fmt.Errorf("%w (the agent connection closed: the pod's VM ended or its agent hung up)", err)
	}
	return err
}

// notInGuest says whether the agent answered that the container or process it was asked about is not there: it
// finished, or an earlier request removed it. The agent's code stops here: runtime/task gives the task API's codes
// from Kiln's kinds alone.
func notInGuest(err error) bool { return status.Code(err) == codes.NotFound }

// fromGuest is the agent's error err in Kiln's terms: its NotFound (notInGuest) is ErrNotFound, with the agent's
// words, which containerd takes for a process that is gone, as it would runc's; other errors are as they are.
func fromGuest(err error) error {
	if notInGuest(err) {
		return fmt.Errorf("%w: %s", ErrNotFound, status.Convert(err).Message())
	}
	return err
}

// timedOut says whether an agent request failed on a deadline; abandon has ruled out the caller's own.
func timedOut(err error) bool {
	return errors.Is(err, context.DeadlineExceeded) || status.Code(err) == codes.DeadlineExceeded
}

// connectionGone says whether an agent request failed because the agent connection is gone: closed, or closed
// because a write to it ran past its deadline (a guest that stopped reading; runtime/sandbox bounds writes).
func connectionGone(err error) bool {
	return errors.Is(err, ttrpc.ErrClosed) || errors.Is(err, os.ErrDeadlineExceeded)
}

// guestLost reports why the guest is gone, nil while it lives.
func (m *Manager) guestLost() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.lost
}

// CreateOptions describe a container to create.
type CreateOptions struct {
	ID string
	// Bundle is the container's bundle directory on the host, kept for the caller's bookkeeping.
	Bundle string
	// Spec is the OCI runtime spec (config.json) as JSON, with host paths already rewritten to guest paths.
	// Its root.path is ignored.
	Spec []byte
	// Rootfs is the container's root relative to the guest's shared directory ("<id>/rootfs").
	Rootfs string
	// IO is attached to the container's init process.
	IO stdio.IO
	// Release, when set, is closed once the init process's output has been delivered or the container is
	// deleted (containerd's fifos, a log file). On error the caller keeps it.
	Release io.Closer
	// HostPid is the container's pid on the host, what containerd gets as its task's and its processes' pid
	// (the caller's stand-in for the container, runtime/standin); the processes' own pids are the guest's.
	HostPid uint32
}

// Create builds the container in the guest (its init waits to be started) with its stdio attached.
func (m *Manager) Create(ctx context.Context, o CreateOptions) (*Container, error) {
	if o.ID == "" {
		return nil, fmt.Errorf("create container: %w: empty id", ErrInvalidArgument)
	}
	c := &Container{id: o.ID, bundle: o.Bundle, hostPid: o.HostPid, m: m, execs: map[string]*Process{}}
	p := newProcess(c, "", lifecycle.Init(), o.IO, o.Release)
	m.mu.Lock()
	if m.closed || m.lost != nil {
		lost := m.lost
		m.mu.Unlock()
		if lost != nil {
			return nil, fmt.Errorf("create container %s: %w: the pod's guest is gone (%v)", o.ID, ErrClosed, lost)
		}
		return nil, fmt.Errorf("create container %s: %w", o.ID, ErrClosed)
	}
	if _, ok := m.containers[o.ID]; ok {
		m.mu.Unlock()
		return nil, fmt.Errorf("create container %s: %w", o.ID, ErrAlreadyExists)
	}
	// Reserve the id while the guest works, so a second Create with the same id fails here.
	m.containers[o.ID] = c
	m.mu.Unlock()

	err := p.launch(ctx, func(rctx context.Context, sp *agentv1.Stdio) (uint32, error) {
		resp, err := m.api.CreateContainer(rctx, &agentv1.CreateContainerRequest{
			ContainerId: o.ID, OciSpec: o.Spec, Rootfs: o.Rootfs, Stdio: sp,
		})
		return resp.GetPid(), err
	})
	if err != nil {
		m.undo(err, "container "+o.ID, func(ctx context.Context) error {
			_, err := m.api.RemoveContainer(ctx, &agentv1.RemoveContainerRequest{ContainerId: o.ID, Force: true})
			return err
		})
		m.forget(o.ID)
		return nil, fmt.Errorf("create container %s: %w", o.ID, m.why(err))
	}
	m.mu.Lock()
	c.init = p
	m.mu.Unlock()
	return c, nil
}

// Get returns a container this manager holds.
func (m *Manager) Get(id string) (*Container, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	c, ok := m.containers[id]
	if !ok || c.init == nil {
		return nil, fmt.Errorf("container %s: %w", id, ErrNotFound)
	}
	return c, nil
}

// GuestInitPid is the guest pid of the init process of the container this manager holds whose host pid is
// hostPid (see CreateOptions.HostPid); false when there is none, or its init has stopped.
func (m *Manager) GuestInitPid(hostPid uint32) (uint32, bool) {
	if hostPid == 0 {
		return 0, false
	}
	m.mu.Lock()
	var c *Container
	for _, x := range m.containers {
		if x.init != nil && x.hostPid == hostPid {
			c = x
			break
		}
	}
	m.mu.Unlock()
	if c == nil || c.init.State() == lifecycle.Stopped || c.init.Pid() == 0 {
		return 0, false
	}
	return c.init.Pid(), true
}

// Len is how many containers the manager holds (created and not yet deleted).
func (m *Manager) Len() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.containers)
}

func (m *Manager) forget(id string) {
	m.mu.Lock()
	delete(m.containers, id)
	m.mu.Unlock()
}

// register reserves a process's exit before the request that starts it.
func (m *Manager) register(p *Process) error {
	k := p.key()
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return ErrClosed
	}
	if _, ok := m.procs[k]; ok {
		return fmt.Errorf("process %q of container %s: %w", k.exec, k.container, ErrAlreadyExists)
	}
	m.procs[k] = p
	return nil
}

func (m *Manager) unregister(p *Process) {
	m.mu.Lock()
	if m.procs[p.key()] == p {
		delete(m.procs, p.key())
	}
	m.mu.Unlock()
}

func (m *Manager) process(k exitKey) *Process {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.procs[k]
}

// endAll ends every registered process whose exit was not seen as killed (137): with err, a wait that ends
// without an exit (ErrClosed); with nil, an exit reported like any other (the guest was lost).
func (m *Manager) endAll(err error) {
	m.mu.Lock()
	ps := make([]*Process, 0, len(m.procs))
	for _, p := range m.procs {
		ps = append(ps, p)
	}
	m.mu.Unlock()
	for _, p := range ps {
		p.finish(Exit{Status: 128 + 9}, err)
		p.closeStreams()
	}
}
