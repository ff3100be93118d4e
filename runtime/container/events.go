package container

import (
	"errors"
	"fmt"
	"time"

	"github.com/containerd/ttrpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
)

// EventKind says what happened.
type EventKind int

// Event kinds.
const (
	EventExit EventKind = iota + 1
	EventOOM
)

func (k EventKind) String() string {
	switch k {
	case EventExit:
		return "exit"
	case EventOOM:
		return "oom"
	}
	return fmt.Sprintf("event(%d)", int(k))
}

// Event is an exit or OOM event from the guest about a process this manager holds.
type Event struct {
	Kind        EventKind
	ContainerID string
	// ExecID is empty for the container's init process (and for OOM events).
	ExecID     string
	Pid        uint32
	ExitStatus uint32
	ExitedAt   time.Time
}

// EventsStreamBroke is what the manager logs each time the events stream breaks: as often as every
// resubscribeDelay, should the agent break it at will (a log that bounds such lines knows it by this).
const EventsStreamBroke = "container events stream broke; subscribing again"

// resubscribeDelay spaces attempts to re-open the events stream after it broke.
const resubscribeDelay = 100 * time.Millisecond

// followEvents keeps one Events stream open for the manager's life. The agent keeps events that happen while
// no one is subscribed and sends them to the next subscriber; after a broken stream the pending processes are
// also asked for their exit directly, so a dropped event cannot leave a waiter hanging.
func (m *Manager) followEvents() {
	defer close(m.loopDone)
	for attempt := 0; ; attempt++ {
		if attempt > 0 {
			select {
			case <-m.ctx.Done():
				return
			case <-time.After(resubscribeDelay):
			}
		}
		events := m.opts.Events
		if events == nil {
			events = m.api
		}
		stream, err := events.Events(m.ctx, &agentv1.EventsRequest{})
		if err == nil {
			if attempt > 0 {
				m.resync()
			}
			err = m.receive(stream)
		}
		if m.ctx.Err() != nil {
			return
		}
		if status.Code(err) == codes.Unimplemented {
			// An agent without the events stream still answers WaitProcess; exits come from there instead.
			m.log.Warn("agent has no container events stream; waiting on each process instead")
			m.mu.Lock()
			m.noEvents = true
			m.mu.Unlock()
			m.resync()
			return
		}
		if errors.Is(err, ttrpc.ErrClosed) {
			// Not closed by Close (checked above): the guest went away under its processes, or its agent hung
			// up while the VM lives on. The pod's watch of its VM tells which, and why the VM ended (the host's
			// OOM killer among others), moments later: it is given that long. Then the guest is given up, and
			// its VM stopped, so that the processes reported killed are.
			select {
			case <-m.ctx.Done():
				return
			case <-time.After(m.opts.lostGrace):
			}
			if m.guestLost() == nil {
				m.giveUp(fmt.Errorf("agent connection closed: %w", err))
			}
			return
		}
		m.log.WithError(err).Warn(EventsStreamBroke)
	}
}

func (m *Manager) receive(stream agentv1.Containers_EventsClient) error {
	for {
		ev, err := stream.Recv()
		if err != nil {
			return fmt.Errorf("receive container event: %w", err)
		}
		m.dispatch(ev)
	}
}

// dispatch settles an event. Events about processes this host does not hold, and exits of processes that
// already ended, are dropped: the guest is untrusted and must not report on containers of other pods, nor make
// the host report one exit twice.
func (m *Manager) dispatch(ev *agentv1.Event) {
	var e Event
	switch {
	case ev.GetExit() != nil:
		x := ev.GetExit()
		e = Event{Kind: EventExit, ContainerID: x.GetContainerId(), ExecID: x.GetExecId(), Pid: x.GetPid(),
			ExitStatus: x.GetExitStatus(), ExitedAt: exitTime(x.GetExitedAt())}
		k := exitKey{e.ContainerID, e.ExecID}
		settled, ok := m.settle(m.process(k), k, Exit{Pid: e.Pid, Status: e.ExitStatus, ExitedAt: e.ExitedAt})
		if !ok {
			return
		}
		e.Pid, e.ExitedAt = settled.Pid, settled.ExitedAt
	case ev.GetOom() != nil:
		e = Event{Kind: EventOOM, ContainerID: ev.GetOom().GetContainerId()}
		if _, err := m.Get(e.ContainerID); err != nil {
			m.log.WithField("container", e.ContainerID).Debug("OOM event for a container this host does not hold")
			return
		}
	default:
		m.log.Debug("ignoring a container event of an unknown kind")
		return
	}
	m.log.WithFields(map[string]any{"container": e.ContainerID, "exec": e.ExecID, "event": e.Kind, "status": e.ExitStatus}).Debug("container event")
	if m.opts.OnEvent != nil {
		m.opts.OnEvent(e)
	}
}

// settle stops p, the process of key k the exit is about (nil when the host holds none), and returns the exit as
// settled (the pid the host recorded at the start, not the one the guest names now); it reports whether this was
// the process's exit: false when the host does not hold the process, or already knew how it ended (a guest may
// report an exit twice, or after a direct wait or a deletion settled it), so that each process's exit is passed
// on once. An exit naming another pid than p's in the guest is an earlier process's of the same id (deleted, its
// id used again), which the guest reported late; one naming a pid before the guest said p's is held until it has
// (holdEarly), and settled then if it is p's.
func (m *Manager) settle(p *Process, k exitKey, e Exit) (Exit, bool) {
	if p == nil {
		m.log.WithFields(map[string]any{"container": k.container, "exec": k.exec}).Debug("exit of a process this host does not hold")
		return Exit{}, false
	}
	if p.holdEarly(e) {
		m.log.WithFields(map[string]any{"container": k.container, "exec": k.exec, "pid": e.Pid}).Debug("exit before the guest said the process's pid: held until it has")
		return Exit{}, false
	}
	if pid := p.Pid(); pid != 0 && e.Pid != 0 && e.Pid != pid {
		m.log.WithFields(map[string]any{"container": k.container, "exec": k.exec, "pid": e.Pid}).Debug("exit of an earlier process of the same id")
		return Exit{}, false
	}
	settled, ok := p.finish(e, nil)
	if !ok {
		m.log.WithFields(map[string]any{"container": k.container, "exec": k.exec}).Debug("exit of a process that already ended")
		return Exit{}, false
	}
	return settled, true
}

// resync asks the agent directly for the exit of every process still pending. One whose start waits for the
// guest's answer (no pid yet) is left to that start: the guest may still hold an earlier, stopped process of the
// same id, whose exit a direct wait would answer with, and the answer names no pid to tell them apart by.
func (m *Manager) resync() {
	m.mu.Lock()
	pending := map[exitKey]*Process{}
	for k, p := range m.procs {
		select {
		case <-p.exited:
		default:
			pending[k] = p
		}
	}
	m.mu.Unlock()
	for k, p := range pending {
		if p.Pid() != 0 {
			go m.waitProcess(k)
		}
	}
}

// waitProcess asks the agent for one process's exit, unless a call asks for it already.
func (m *Manager) waitProcess(k exitKey) {
	m.mu.Lock()
	if m.waiting[k] {
		m.mu.Unlock()
		return
	}
	m.waiting[k] = true
	m.mu.Unlock()
	defer func() {
		m.mu.Lock()
		delete(m.waiting, k)
		m.mu.Unlock()
	}()
	// The process asked about: a late answer must not end another the id names by then.
	p := m.process(k)
	resp, err := m.api.WaitProcess(m.ctx, &agentv1.WaitProcessRequest{ContainerId: k.container, ExecId: k.exec})
	if err != nil {
		m.log.WithError(err).WithFields(map[string]any{"container": k.container, "exec": k.exec}).Debug("wait for process")
		return
	}
	m.settle(p, k, Exit{Status: resp.GetExitStatus(), ExitedAt: exitTime(resp.GetExitedAt())})
}

// exitTime is when the guest says a process exited; zero, for finish to take the host's time, when it does not
// say (AsTime of nothing is 1970).
func exitTime(ts *timestamppb.Timestamp) time.Time {
	if ts == nil {
		return time.Time{}
	}
	return ts.AsTime()
}
