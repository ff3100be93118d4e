package task

import (
	"testing"

	tasktypes "github.com/containerd/containerd/api/types/task"
	"github.com/containerd/errdefs"
)

func TestTransitions(t *testing.T) {
	all := []procState{stateCreated, stateRunning, statePaused, stateStopped, stateDeleted}
	allowedMoves := map[[2]procState]bool{
		{stateCreated, stateRunning}: true, {stateCreated, stateStopped}: true, {stateCreated, stateDeleted}: true,
		{stateRunning, statePaused}: true, {stateRunning, stateStopped}: true,
		{statePaused, stateRunning}: true, {statePaused, stateStopped}: true,
		{stateStopped, stateDeleted}: true,
	}
	for _, from := range all {
		for _, to := range all {
			l := &lifecycle{state: from}
			err := l.transition(to)
			if want := allowedMoves[[2]procState{from, to}]; want != (err == nil) {
				t.Errorf("%s -> %s: err %v, want allowed=%t", from, to, err, want)
			}
			if err != nil {
				if !errdefs.IsFailedPrecondition(err) {
					t.Errorf("%s -> %s: error %v is not FailedPrecondition", from, to, err)
				}
				if l.get() != from {
					t.Errorf("%s -> %s: refused move changed the state to %s", from, to, l.get())
				}
			}
		}
	}
}

func TestCannotResumeStoppedTask(t *testing.T) {
	l := &lifecycle{state: stateStopped}
	if err := l.require("resume", statePaused); !errdefs.IsFailedPrecondition(err) {
		t.Fatalf("require(resume) on a stopped process: %v, want FailedPrecondition", err)
	}
}

func TestStatusMapping(t *testing.T) {
	for s, want := range map[procState]tasktypes.Status{
		stateCreated: tasktypes.Status_CREATED, stateRunning: tasktypes.Status_RUNNING,
		statePaused: tasktypes.Status_PAUSED, stateStopped: tasktypes.Status_STOPPED, stateDeleted: tasktypes.Status_STOPPED,
	} {
		if got := s.status(); got != want {
			t.Errorf("%s: status %s, want %s", s, got, want)
		}
	}
}
