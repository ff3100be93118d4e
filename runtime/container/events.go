package container

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/containerd/ttrpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

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

// Event is an exit or OOM event from the guest.
type Event struct {
	Kind        EventKind
	ContainerID string
	// ExecID is empty for the container's init process (and for OOM events).
	ExecID     string
	Pid        uint32
	ExitStatus uint32
	ExitedAt   time.Time
}

// Exit is how a process ended.
type Exit struct {
	Pid uint32
	// Status is the exit code, or 128+signal when a signal killed the process.
	Status   uint32
	ExitedAt time.Time
}

type exitKey struct{ container, exec string }

// waiter is one process's pending exit, completed once by an event, a WaitProcess answer, or a failure.
type waiter struct {
	once sync.Once
	done chan struct{}
	exit Exit
	err  error
}

func (w *waiter) complete(e Exit, err error) {
	w.once.Do(func() {
		w.exit, w.err = e, err
		close(w.done)
	})
}

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
			m.log.WithError(err).Debug("agent connection closed; no more container events")
			m.failWaiters(fmt.Errorf("%w: agent connection: %v", ErrClosed, err))
			return
		}
		m.log.WithError(err).Warn("container events stream broke; subscribing again")
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

func (m *Manager) dispatch(ev *agentv1.Event) {
	var e Event
	switch {
	case ev.GetExit() != nil:
		x := ev.GetExit()
		e = Event{Kind: EventExit, ContainerID: x.GetContainerId(), ExecID: x.GetExecId(), Pid: x.GetPid(),
			ExitStatus: x.GetExitStatus(), ExitedAt: x.GetExitedAt().AsTime()}
		m.exited(exitKey{e.ContainerID, e.ExecID}, Exit{Pid: e.Pid, Status: e.ExitStatus, ExitedAt: e.ExitedAt})
	case ev.GetOom() != nil:
		e = Event{Kind: EventOOM, ContainerID: ev.GetOom().GetContainerId()}
		m.mu.Lock()
		c := m.containers[e.ContainerID]
		m.mu.Unlock()
		if c != nil {
			c.ooms.Add(1)
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

// exited completes the process's waiter and, for an init process, stops its container.
func (m *Manager) exited(k exitKey, e Exit) {
	m.mu.Lock()
	w := m.waiters[k]
	c := m.containers[k.container]
	m.mu.Unlock()
	if w == nil {
		m.log.WithFields(map[string]any{"container": k.container, "exec": k.exec}).Debug("exit of a process this host does not hold")
		return
	}
	if k.exec == "" && c != nil {
		c.processExited()
	}
	w.complete(e, nil)
}

// resync asks the agent directly for the exit of every process still pending.
func (m *Manager) resync() {
	m.mu.Lock()
	pending := make(map[exitKey]*waiter, len(m.waiters))
	for k, w := range m.waiters {
		pending[k] = w
	}
	m.mu.Unlock()
	for k, w := range pending {
		select {
		case <-w.done:
			continue
		default:
		}
		go m.waitProcess(k)
	}
}

// waitProcess asks the agent for one process's exit.
func (m *Manager) waitProcess(k exitKey) {
	resp, err := m.api.WaitProcess(m.ctx, &agentv1.WaitProcessRequest{ContainerId: k.container, ExecId: k.exec})
	if err != nil {
		m.log.WithError(err).WithFields(map[string]any{"container": k.container, "exec": k.exec}).Debug("wait for process")
		return
	}
	m.exited(k, Exit{Status: resp.GetExitStatus(), ExitedAt: resp.GetExitedAt().AsTime()})
}

func (m *Manager) register(k exitKey) (*waiter, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return nil, ErrClosed
	}
	if _, ok := m.waiters[k]; ok {
		return nil, fmt.Errorf("process %q of container %s: %w", k.exec, k.container, ErrAlreadyExists)
	}
	w := &waiter{done: make(chan struct{})}
	m.waiters[k] = w
	return w, nil
}

func (m *Manager) unregister(k exitKey) {
	m.mu.Lock()
	delete(m.waiters, k)
	m.mu.Unlock()
}

func (m *Manager) failWaiters(err error) {
	m.mu.Lock()
	ws := make([]*waiter, 0, len(m.waiters))
	for _, w := range m.waiters {
		ws = append(ws, w)
	}
	m.mu.Unlock()
	for _, w := range ws {
		w.complete(Exit{}, err)
	}
}

// waitExit blocks until w completes or ctx ends.
func waitExit(ctx context.Context, w *waiter) (Exit, error) {
	select {
	case <-w.done:
		return w.exit, w.err
	case <-ctx.Done():
		return Exit{}, ctx.Err()
	}
}
