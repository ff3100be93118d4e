package task

import (
	"fmt"
	"sync"

	tasktypes "github.com/containerd/containerd/api/types/task"
	"github.com/containerd/errdefs"
)

// procState is where a process is in its life as containerd sees it.
type procState int

// Process states, as containerd's runc shim has them.
const (
	stateCreated procState = iota
	stateRunning
	statePaused
	stateStopped
	stateDeleted
)

func (s procState) String() string {
	switch s {
	case stateCreated:
		return "created"
	case stateRunning:
		return "running"
	case statePaused:
		return "paused"
	case stateStopped:
		return "stopped"
	case stateDeleted:
		return "deleted"
	}
	return fmt.Sprintf("state(%d)", int(s))
}

// status is the state as containerd's API spells it.
func (s procState) status() tasktypes.Status {
	switch s {
	case stateCreated:
		return tasktypes.Status_CREATED
	case stateRunning:
		return tasktypes.Status_RUNNING
	case statePaused:
		return tasktypes.Status_PAUSED
	case stateStopped, stateDeleted:
		return tasktypes.Status_STOPPED
	}
	return tasktypes.Status_UNKNOWN
}

// allowed lists every move a process may make. Anything else is refused, so that "resume a stopped task" is an
// error containerd receives, not a request the guest has to make sense of.
func allowed(from, to procState) bool {
	switch from {
	case stateCreated:
		// A created process can be killed (it then stops without having run) or deleted.
		return to == stateRunning || to == stateStopped || to == stateDeleted
	case stateRunning:
		return to == statePaused || to == stateStopped
	case statePaused:
		// A paused process can still die: SIGKILL goes through the freezer, and so does the OOM killer.
		return to == stateRunning || to == stateStopped
	case stateStopped:
		return to == stateDeleted
	}
	return false
}

// lifecycle guards one process's state.
type lifecycle struct {
	mu    sync.Mutex
	state procState
}

func (l *lifecycle) get() procState {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.state
}

// transition moves to `to`, or returns a FailedPrecondition error naming the move it refused.
func (l *lifecycle) transition(to procState) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if !allowed(l.state, to) {
		return fmt.Errorf("%w: a %s process cannot become %s", errdefs.ErrFailedPrecondition, l.state, to)
	}
	l.state = to
	return nil
}

// require refuses an operation unless the process is in one of states.
func (l *lifecycle) require(op string, states ...procState) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, s := range states {
		if l.state == s {
			return nil
		}
	}
	return fmt.Errorf("%w: cannot %s a %s process", errdefs.ErrFailedPrecondition, op, l.state)
}
