package container

import (
	"fmt"
	"slices"
)

// State is where a process (or, for its init process, a container) is in
// its life.
type State int

// The states. Paused only exists for a container's init process: freezing
// is per container.
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

// transitionTable lists, for each state, the states it may move to.
type transitionTable map[State][]State

// initTransitions is the life of a container (its init process): killed
// before start it stops; a paused container can be killed (SIGKILL reaches
// frozen tasks under cgroup v2).
func initTransitions() transitionTable {
	return transitionTable{
		Created: {Running, Stopped, Deleted},
		Running: {Paused, Stopped},
		Paused:  {Running, Stopped},
		Stopped: {Deleted},
	}
}

// execTransitions is the life of an exec process: it is never paused on its
// own, and it is started within the request that creates it.
func execTransitions() transitionTable {
	return transitionTable{
		Created: {Running, Stopped, Deleted},
		Running: {Stopped},
		Stopped: {Deleted},
	}
}

// machine is one process's state with the moves its table allows. It is
// not safe for concurrent use: its owner's lock guards it.
type machine struct {
	table transitionTable
	state State
}

func newMachine(table transitionTable) *machine {
	return &machine{table: table, state: Created}
}

// State is the current state.
func (m *machine) State() State { return m.state }

// Can says whether the move to next is allowed now.
func (m *machine) Can(next State) bool {
	return slices.Contains(m.table[m.state], next)
}

// Transition moves to next, or says why it may not.
func (m *machine) Transition(next State) error {
	if !m.Can(next) {
		return &TransitionError{From: m.state, To: next}
	}
	m.state = next
	return nil
}

// TransitionError is a move the state table does not allow, such as
// pausing a stopped container.
type TransitionError struct {
	From, To State
}

func (e *TransitionError) Error() string {
	return fmt.Sprintf("cannot go from %s to %s", e.From, e.To)
}
