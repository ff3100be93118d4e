package container

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"sync"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
	"github.com/kiln-runtime/kiln/proto/lifecycle"
	"github.com/kiln-runtime/kiln/runtime/stdio"
)

// Exit is how a process ended.
type Exit struct {
	Pid uint32
	// Status is the exit code, or 128+signal when a signal killed the process.
	Status   uint32
	ExitedAt time.Time
}

// sigKill is SIGKILL's number: a kill the agent cannot deliver is delivered by stopping the VM (abandon).
const sigKill = 9

// Process is a container's init process or one of its exec processes.
type Process struct {
	c       *Container
	execID  string
	io      stdio.IO
	release io.Closer
	// spec is an exec process's OCI process, encoded, kept until Start.
	spec []byte

	mu      sync.Mutex
	sm      *lifecycle.Machine
	pid     uint32
	streams *stdio.Streams
	// starting is closed when a Start in progress has returned from its callback; nil when none is.
	starting chan struct{}
	// delivering is set once a goroutine delivers the process's output and exit (deliver).
	delivering bool
	// killWatched is set once a SIGKILL was delivered and the exit it owes is watched for (watchKill).
	killWatched bool
	// early holds exits that named a pid while the guest's answer to the request creating the process, which
	// says its pid, was still out (holdEarly): the process's own, if it exited at once, or an earlier one's of
	// the same id, reported late. Settled once the answer came, dropped when the request failed.
	early   []Exit
	exit    Exit
	exitErr error
	// exited is closed once the exit is known; done once its output is delivered too (or given up on).
	exited   chan struct{}
	done     chan struct{}
	doneOnce sync.Once
}

func newProcess(c *Container, execID string, table lifecycle.Table, io stdio.IO, release io.Closer) *Process {
	return &Process{c: c, execID: execID, io: io, release: release, sm: lifecycle.New(table),
		exited: make(chan struct{}), done: make(chan struct{})}
}

func (p *Process) key() exitKey { return exitKey{p.c.id, p.execID} }

// ID is the exec id, empty for the init process.
func (p *Process) ID() string { return p.execID }

// Container is the container the process belongs to.
func (p *Process) Container() *Container { return p.c }

// Pid is the process's pid in the guest, 0 before it was created there.
func (p *Process) Pid() uint32 {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.pid
}

// State is where the process is in its life.
func (p *Process) State() lifecycle.State {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.sm.State()
}

// Release is what the caller gave to be closed with the process's IO (CreateOptions.Release, AddExec).
func (p *Process) Release() io.Closer { return p.release }

// Terminal says whether the process has a terminal.
func (p *Process) Terminal() bool { return p.io.Terminal }

func (p *Process) describe() string {
	if p.execID == "" {
		return "container " + p.c.id
	}
	return fmt.Sprintf("process %s of container %s", p.execID, p.c.id)
}

// require refuses an operation the process's state does not allow.
func (p *Process) require(op string, states ...lifecycle.State) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if err := p.sm.Require(op, states...); err != nil {
		return fmt.Errorf("%s: %w", p.describe(), err)
	}
	return nil
}

// claimForDelete readies an exec for its Delete, and says whether it had exited. One never started is stopped
// (killed, for the record) in the same step, so that no Start begins after it; one whose Start is under way is
// refused, as runc's shim makes a Delete wait for the Start and refuses the running process then: the guest's
// process would run on with no one on the host to wait for it or kill it.
func (p *Process) claimForDelete() (exited bool, err error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if err := p.sm.Require("delete", lifecycle.Created, lifecycle.Stopped); err != nil {
		return false, fmt.Errorf("%s: %w", p.describe(), err)
	}
	if p.starting != nil {
		return false, fmt.Errorf("delete %s: %w: its start is under way", p.describe(), ErrInvalidState)
	}
	if p.sm.State() == lifecycle.Stopped {
		return true, nil
	}
	p.finishLocked(Exit{Status: 128 + 9}, ErrDeleted)
	return false, nil
}

// transition moves the process through its table.
func (p *Process) transition(next lifecycle.State) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if err := p.sm.Transition(next); err != nil {
		return fmt.Errorf("%s: %w", p.describe(), err)
	}
	return nil
}

// launch opens the process's streams, reserves its exit, makes the agent request that creates it in the guest,
// and starts relaying and delivering.
func (p *Process) launch(ctx context.Context, request func(context.Context, *agentv1.Stdio) (uint32, error)) error {
	m := p.c.m
	streams, err := stdio.Open(ctx, m.dialer, p.io)
	if err != nil {
		return err
	}
	if err := m.register(p); err != nil {
		_ = streams.Close()
		return err
	}
	pid, err := request(ctx, streams.Proto())
	if err != nil {
		m.unregister(p)
		_ = streams.Close()
		p.mu.Lock()
		p.early = nil
		p.mu.Unlock()
		select {
		case <-p.exited:
			// The guest was lost (or an exit came) while the request was out: the process is finished, and no
			// delivery will end it, so its waiters and its delete are let go here.
			p.settle()
		default:
		}
		return err
	}
	streams.Start()
	p.mu.Lock()
	p.pid, p.streams, p.delivering = pid, streams, true
	early := p.early
	p.early = nil
	p.mu.Unlock()
	go p.deliver()
	for _, e := range early {
		m.settle(p, p.key(), e)
	}
	m.mu.Lock()
	direct := m.noEvents
	m.mu.Unlock()
	if direct {
		go m.waitProcess(p.key())
	}
	return nil
}

// Start runs the process: the container's init, or an exec process added with Container.AddExec. onStarted,
// when set, is called once the guest started it, before any exit of the process is reported to OnExit; it is
// where a caller reports the start.
func (p *Process) Start(ctx context.Context, onStarted func()) error {
	p.mu.Lock()
	if err := p.sm.Require("start", lifecycle.Created); err != nil || p.starting != nil {
		p.mu.Unlock()
		if err == nil {
			err = fmt.Errorf("%w: already starting", ErrInvalidState)
		}
		return fmt.Errorf("start %s: %w", p.describe(), err)
	}
	if p.execID != "" {
		if _, exited := p.c.init.ExitStatus(); exited {
			p.mu.Unlock()
			// The init's exit is the container's last (endExecs): nothing starts after it, as with runc.
			return fmt.Errorf("start %s: %w: the container's init process has exited", p.describe(), ErrInvalidState)
		}
	}
	gate := make(chan struct{})
	p.starting = gate
	spec := p.spec
	p.mu.Unlock()
	defer func() {
		p.mu.Lock()
		p.starting = nil
		p.mu.Unlock()
		close(gate)
	}()

	var err error
	if p.execID == "" {
		_, err = p.c.m.api.StartContainer(ctx, &agentv1.StartContainerRequest{ContainerId: p.c.id})
	} else {
		err = p.launch(ctx, func(rctx context.Context, sp *agentv1.Stdio) (uint32, error) {
			resp, err := p.c.m.api.ExecProcess(rctx, &agentv1.ExecProcessRequest{
				ContainerId: p.c.id, ExecId: p.execID, Process: spec, Stdio: sp,
			})
			return resp.GetPid(), err
		})
		if err != nil {
			// Under the start's gate: a second Start is refused until the undo is done.
			p.c.m.undo(err, p.describe(), func(ctx context.Context) error {
				_, err := p.c.m.api.SignalProcess(ctx, &agentv1.SignalProcessRequest{ContainerId: p.c.id, ExecId: p.execID, Signal: sigKill})
				return err
			})
		}
	}
	if err != nil {
		return fmt.Errorf("start %s: %w", p.describe(), p.c.m.why(err))
	}
	p.mu.Lock()
	// A process that exits at once may be stopped already: its start still happened.
	if p.sm.State() != lifecycle.Stopped {
		err = p.sm.Transition(lifecycle.Running)
	}
	p.mu.Unlock()
	if err != nil {
		return fmt.Errorf("start %s: %w", p.describe(), err)
	}
	if onStarted != nil {
		onStarted()
	}
	return nil
}

// maxEarly bounds the exits held for one process while its pid is not known: the process's own and an earlier
// one's are two; a guest that reports more is lying, and the oldest are dropped.
const maxEarly = 4

// holdEarly keeps e, an exit naming a pid, when the process's pid is not known yet (launch has registered it
// and waits for the guest's answer), and says whether it did: whose exit it is can be told only from the answer.
func (p *Process) holdEarly(e Exit) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.pid != 0 || e.Pid == 0 {
		return false
	}
	if len(p.early) == maxEarly {
		p.early = p.early[1:]
	}
	p.early = append(p.early, e)
	return true
}

// finish records how the process ended and stops it: the one path by which a process stops, whatever told the
// host. err is nil for an exit the guest reported, else why none will come (ErrDeleted, ErrClosed). Only the
// first call counts; it reports whether it was this one.
func (p *Process) finish(e Exit, err error) (Exit, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.finishLocked(e, err)
}

// finishLocked is finish, under p.mu.
func (p *Process) finishLocked(e Exit, err error) (Exit, bool) {
	select {
	case <-p.exited:
		return Exit{}, false
	default:
	}
	// The pid containerd was told at the start; an exit cannot name another.
	if p.pid != 0 {
		e.Pid = p.pid
	}
	if e.ExitedAt.IsZero() {
		e.ExitedAt = time.Now()
	}
	p.exit, p.exitErr = e, err
	if p.sm.Can(lifecycle.Stopped) {
		_ = p.sm.Transition(lifecycle.Stopped)
	} else if st := p.sm.State(); st != lifecycle.Stopped && st != lifecycle.Deleted {
		p.c.m.log.WithField("state", st).Warnf("%s ended in a state that cannot stop", p.describe())
	}
	close(p.exited)
	return e, true
}

// deliver waits for the exit, then for the output the guest sent before it, releases the caller's IO, waits
// for a Start in progress to report, and reports the exit.
func (p *Process) deliver() {
	m := p.c.m
	<-p.exited
	p.mu.Lock()
	e, exitErr, streams := p.exit, p.exitErr, p.streams
	p.mu.Unlock()
	l := m.log.WithFields(map[string]any{"container": p.c.id, "exec": p.execID})
	if exitErr == nil {
		dctx, cancel := context.WithTimeout(m.ctx, m.opts.DrainTimeout)
		if err := streams.Wait(dctx); err != nil {
			l.WithError(err).Warn("output still open after the process exited; closing it")
		}
		cancel()
		if err := streams.Err(); err != nil {
			l.WithError(err).Debug("stdio relay")
		}
	}
	_ = streams.Close()
	p.releaseIO()
	p.mu.Lock()
	gate := p.starting
	p.mu.Unlock()
	if gate != nil {
		<-gate
	}
	if p.execID == "" && exitErr == nil {
		p.c.endExecs(l)
	}
	if exitErr == nil && m.opts.OnExit != nil {
		m.opts.OnExit(p, e)
	}
	p.doneOnce.Do(func() { close(p.done) })
}

// settle ends a process that no delivery ends (none started): its IO released and its waiters let go, once.
func (p *Process) settle() {
	p.doneOnce.Do(func() {
		p.releaseIO()
		close(p.done)
	})
}

func (p *Process) releaseIO() {
	if p.release == nil {
		return
	}
	if err := p.release.Close(); err != nil {
		p.c.m.log.WithError(err).WithFields(map[string]any{"container": p.c.id, "exec": p.execID}).Warn("release process IO")
	}
}

func (p *Process) closeStreams() {
	p.mu.Lock()
	s := p.streams
	p.mu.Unlock()
	if s != nil {
		_ = s.Close()
	}
}

// remove settles a process whose container or exec entry is deleted: an exit not seen by now is recorded as a
// SIGKILL with ErrDeleted, and the process becomes Deleted. It returns how the process ended.
func (p *Process) remove() (Exit, error) {
	p.finish(Exit{Status: 128 + 9}, ErrDeleted)
	p.mu.Lock()
	err := p.sm.Transition(lifecycle.Deleted)
	e, delivering := p.exit, p.delivering
	p.mu.Unlock()
	p.c.m.unregister(p)
	p.closeStreams()
	if !delivering {
		p.settle()
	}
	if err != nil {
		return e, fmt.Errorf("delete %s: %w", p.describe(), err)
	}
	return e, nil
}

// Wait blocks until the process has exited and its output is in the caller's writers (or was given up on after
// the manager's DrainTimeout, which is logged), then returns how it ended. A process deleted or cut off before
// its exit was seen returns a SIGKILL exit with ErrDeleted or ErrClosed.
func (p *Process) Wait(ctx context.Context) (Exit, error) {
	select {
	case <-p.done:
	case <-ctx.Done():
		return Exit{}, fmt.Errorf("wait for %s: %w", p.describe(), ctx.Err())
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.exitErr != nil {
		return p.exit, fmt.Errorf("wait for %s: %w", p.describe(), p.exitErr)
	}
	return p.exit, nil
}

// ExitStatus is how the process ended, once known.
func (p *Process) ExitStatus() (Exit, bool) {
	select {
	case <-p.exited:
	default:
		return Exit{}, false
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.exit, true
}

// Signal sends signal to this process only.
func (p *Process) Signal(ctx context.Context, signal uint32) error {
	if err := p.require("signal", lifecycle.Running, lifecycle.Paused); err != nil {
		return fmt.Errorf("signal %d: %w", signal, err)
	}
	r := &agentv1.SignalProcessRequest{ContainerId: p.c.id, ExecId: p.execID, Signal: signal}
	var err error
	if signal == sigKill {
		var gaveUp bool
		gaveUp, err = p.c.m.mustAnswer(ctx, "SIGKILL to "+p.describe(), func(ctx context.Context) error {
			_, err := p.c.m.api.SignalProcess(ctx, r)
			if err == nil {
				// Here, so that a SIGKILL delivered after its caller stopped waiting is followed too.
				p.c.m.watchKill(p)
			}
			return err
		})
		if gaveUp {
			return nil
		}
	} else {
		_, err = p.c.m.api.SignalProcess(ctx, r)
	}
	if err != nil {
		return fmt.Errorf("signal %d to %s: %w", signal, p.describe(), fromGuest(err))
	}
	return nil
}

// Resize sets the process's terminal size.
func (p *Process) Resize(ctx context.Context, width, height uint32) error {
	if !p.io.Terminal {
		return fmt.Errorf("resize terminal of %s: %w: it has no terminal", p.describe(), ErrInvalidState)
	}
	if err := p.require("resize", lifecycle.Created, lifecycle.Running, lifecycle.Paused); err != nil {
		return err
	}
	if p.execID != "" {
		// An exec not started yet (nerdctl's `exec -t` sizes it first) starts at that size, as runc's does.
		p.mu.Lock()
		if p.sm.State() == lifecycle.Created && p.starting == nil {
			spec, err := withConsoleSize(p.spec, width, height)
			if err == nil {
				p.spec = spec
			}
			p.mu.Unlock()
			if err != nil {
				return fmt.Errorf("resize terminal of %s: %w", p.describe(), err)
			}
			return nil
		}
		p.mu.Unlock()
	}
	_, err := p.c.m.api.ResizeTTY(ctx, &agentv1.ResizeTTYRequest{ContainerId: p.c.id, ExecId: p.execID, Width: width, Height: height})
	if err != nil {
		return fmt.Errorf("resize terminal of %s to %dx%d: %w", p.describe(), width, height, fromGuest(err))
	}
	return nil
}

// withConsoleSize returns the encoded process spec with its terminal's size set.
func withConsoleSize(spec []byte, width, height uint32) ([]byte, error) {
	var ps specs.Process
	if err := json.Unmarshal(spec, &ps); err != nil {
		return nil, err
	}
	ps.ConsoleSize = &specs.Box{Width: uint(width), Height: uint(height)}
	return json.Marshal(&ps)
}

// StdinDone is closed once the caller's stdin has been relayed to its end (at once when there is none).
func (p *Process) StdinDone() <-chan struct{} {
	p.mu.Lock()
	s := p.streams
	p.mu.Unlock()
	if s == nil || !s.HasStdin() {
		c := make(chan struct{})
		close(c)
		return c
	}
	return s.StdinDone()
}

// CloseStdin ends the process's input. With a stdin stream of its own the stream is half-closed, which the
// process sees as EOF after every byte already sent (an RPC could overtake bytes still in flight on the
// stream); otherwise the agent is asked to close it.
func (p *Process) CloseStdin(ctx context.Context) error {
	p.mu.Lock()
	s := p.streams
	p.mu.Unlock()
	if s == nil {
		return nil
	}
	if s.HasStdin() {
		s.CloseStdin()
		return nil
	}
	_, err := p.c.m.api.CloseStdin(ctx, &agentv1.CloseStdinRequest{ContainerId: p.c.id, ExecId: p.execID})
	if err != nil {
		return fmt.Errorf("close stdin of %s: %w", p.describe(), fromGuest(err))
	}
	return nil
}
