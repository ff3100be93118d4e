package lifecycle

import (
	"errors"
	"testing"
)

func TestInitTransitions(t *testing.T) {
	tests := []struct {
		name string
		path []State
		bad  State // the move that must be refused after path; -1 for none
	}{
		{"start, pause, resume, stop, delete", []State{Running, Paused, Running, Stopped, Deleted}, -1},
		{"killed before start", []State{Stopped, Deleted}, -1},
		{"deleted before start", []State{Deleted}, -1},
		{"killed while paused", []State{Running, Paused, Stopped}, -1},
		{"cannot pause a stopped container", []State{Running, Stopped}, Paused},
		{"cannot pause a created container", nil, Paused},
		{"cannot resume a running container", []State{Running}, Running},
		{"cannot delete a running container", []State{Running}, Deleted},
		{"cannot start twice after stop", []State{Running, Stopped}, Running},
		{"nothing after delete", []State{Deleted}, Running},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := New(Init())
			for _, s := range tt.path {
				if err := m.Transition(s); err != nil {
					t.Fatalf("move to %s: %v", s, err)
				}
			}
			if tt.bad < 0 {
				return
			}
			before := m.State()
			err := m.Transition(tt.bad)
			var te *TransitionError
			if !errors.As(err, &te) || te.From != before || te.To != tt.bad {
				t.Fatalf("move %s -> %s: err %v, want a TransitionError", before, tt.bad, err)
			}
			if m.State() != before {
				t.Errorf("refused move changed the state to %s", m.State())
			}
		})
	}
}

func TestExecNeverPauses(t *testing.T) {
	m := New(Exec())
	if err := m.Transition(Running); err != nil {
		t.Fatal(err)
	}
	if m.Can(Paused) {
		t.Error("an exec process may be paused on its own")
	}
	if err := m.Transition(Stopped); err != nil {
		t.Fatal(err)
	}
}
