package container

import (
	"fmt"
	"sync"
)

// State is where a container is in its lifecycle as the host sees it.
type State int

// Container states.
const (
	Created State = iota
	Running
	Paused
	Stopped
	Deleted
)

func (s State) String() string {
	switch s {
	case Created:
		return "created"
	case Running:
		return "running"
	case Paused:
		return "paused"
	case Stopped:
		return "stopped"
	case Deleted:
		return "deleted"
	}
	return fmt.Sprintf("state(%d)", int(s))
}

// allowed lists every move the lifecycle allows. Anything else is refused with an error, so "cannot pause a
// stopped container" is an answer, not a request the agent has to reject.
func allowed(from, to State) bool {
	switch from {
	case Created:
		// A created container stops when it is killed before it starts; it can be deleted without running.
		return to == Running || to == Stopped || to == Deleted
	case Running:
		return to == Paused || to == Stopped
	case Paused:
		// A paused container's init can still die (OOM killer, SIGKILL through the freezer).
		return to == Running || to == Stopped
	case Stopped:
		return to == Deleted
	}
	return false
}

// stateMachine guards a container's state.
type stateMachine struct {
	mu    sync.Mutex
	state State
}

func (m *stateMachine) get() State {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.state
}

// transition moves to `to` or says why it cannot.
func (m *stateMachine) transition(to State) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if !allowed(m.state, to) {
		return fmt.Errorf("%w: %s container cannot become %s", ErrInvalidState, m.state, to)
	}
	m.state = to
	return nil
}

// advance moves from `from` to `to` when the container is still in `from`, and otherwise leaves it: an exit
// event may have moved it on while a request was under way.
func (m *stateMachine) advance(from, to State) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.state == from {
		m.state = to
	}
}

// require refuses an operation that needs one of the given states.
func (m *stateMachine) require(op string, states ...State) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, s := range states {
		if m.state == s {
			return nil
		}
	}
	return fmt.Errorf("%w: cannot %s a %s container", ErrInvalidState, op, m.state)
}
