// Package lifecycle is the one table of the moves a container's processes may make: created, running, paused,
// stopped, deleted. The guest agent and the host shim both keep each process's state with it, so that "cannot
// pause a stopped container" means the same on both sides of the agent API. It knows nothing of containers,
// processes or the agent; its Machine is not safe for concurrent use, its owner's lock guards it.
package lifecycle

import (
	"errors"
	"fmt"
	"slices"
)

// State is where a process (or, for its init process, a container) is in its life.
type State int

// The states. Paused exists only for a container's init process: freezing is per container.
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

// Table lists, for each state, the states it may move to.
type Table map[State][]State

// Init is the life of a container (its init process): killed before start it stops; a paused container can be
// killed (SIGKILL and the OOM killer reach frozen tasks under cgroup v2).
func Init() Table {
	return Table{
		Created: {Running, Stopped, Deleted},
		Running: {Paused, Stopped},
		Paused:  {Running, Stopped},
		Stopped: {Deleted},
	}
}

// Exec is the life of an exec process: it is never paused on its own.
func Exec() Table {
	return Table{
		Created: {Running, Stopped, Deleted},
		Running: {Stopped},
		Stopped: {Deleted},
	}
}

// Machine is one process's state with the moves its table allows.
type Machine struct {
	table Table
	state State
}

// New starts a machine in Created.
func New(table Table) *Machine { return &Machine{table: table, state: Created} }

// State is the current state.
func (m *Machine) State() State { return m.state }

// Can says whether the move to next is allowed now.
func (m *Machine) Can(next State) bool { return slices.Contains(m.table[m.state], next) }

// Transition moves to next, or returns a *TransitionError naming the move it refused.
func (m *Machine) Transition(next State) error {
	if !m.Can(next) {
		return &TransitionError{From: m.state, To: next}
	}
	m.state = next
	return nil
}

// Require returns nil when the machine is in one of states, else a *StateError naming the operation.
func (m *Machine) Require(op string, states ...State) error {
	if slices.Contains(states, m.state) {
		return nil
	}
	return &StateError{Op: op, State: m.state}
}

// ErrInvalidState is what every refusal of this package matches with errors.Is.
var ErrInvalidState = errors.New("invalid state")

// TransitionError is a move the table does not allow, such as pausing a stopped container.
type TransitionError struct {
	From, To State
}

func (e *TransitionError) Error() string { return fmt.Sprintf("cannot go from %s to %s", e.From, e.To) }

// Is makes a TransitionError match ErrInvalidState.
func (e *TransitionError) Is(target error) bool { return target == ErrInvalidState }

// StateError is an operation that needs another state, such as exec in a stopped container.
type StateError struct {
	Op    string
	State State
}

func (e *StateError) Error() string { return fmt.Sprintf("cannot %s a %s process", e.Op, e.State) }

// Is makes a StateError match ErrInvalidState.
func (e *StateError) Is(target error) bool { return target == ErrInvalidState }
