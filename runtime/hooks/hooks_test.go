package hooks

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

func TestCheck(t *testing.T) {
	for _, tc := range []struct {
		name  string
		hooks *specs.Hooks
		want  error // nil: accepted
	}{
		{"none", nil, nil},
		{"host hooks", &specs.Hooks{CreateRuntime: []specs.Hook{{Path: "/bin/true"}}, Poststop: []specs.Hook{{Path: "/bin/true"}}}, nil},
		{"createContainer", &specs.Hooks{CreateContainer: []specs.Hook{{Path: "/bin/true"}}}, errdefs.ErrNotImplemented},
		{"startContainer", &specs.Hooks{StartContainer: []specs.Hook{{Path: "/bin/true"}}}, errdefs.ErrNotImplemented},
		{"a name", &specs.Hooks{Prestart: []specs.Hook{{Path: "true"}}}, errdefs.ErrInvalidArgument},
		{"a relative path", &specs.Hooks{Poststop: []specs.Hook{{Path: "/bin/true"}, {Path: "./hook"}}}, errdefs.ErrInvalidArgument},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := Check(&specs.Spec{Hooks: tc.hooks})
			if (err == nil) != (tc.want == nil) || tc.want != nil && !errors.Is(err, tc.want) {
				t.Fatalf("err %v, want %v", err, tc.want)
			}
		})
	}
}

// script writes an executable shell script and returns its path.
func script(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "hook")
	if err := os.WriteFile(p, []byte("#!/bin/sh\n"+body), 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestCreateRuntimeGetsStateInOrder(t *testing.T) {
	out := filepath.Join(t.TempDir(), "out")
	log := script(t, `cat >> `+out+`; echo " $1 $HOOKVAR" >> `+out+"\n")
	spec := &specs.Spec{Hooks: &specs.Hooks{
		Prestart:      []specs.Hook{{Path: log, Args: []string{"hook", "pre"}, Env: []string{"HOOKVAR=x"}}},
		CreateRuntime: []specs.Hook{{Path: log, Args: []string{"hook", "create"}}},
	}}
	st := State{ID: "c1", Bundle: "/b", Pid: 42, Annotations: map[string]string{"a": "b"}}
	if err := CreateRuntime(context.Background(), spec, st); err != nil {
		t.Fatal(err)
	}
	raw, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(string(raw)), "\n")
	if len(lines) != 2 || !strings.HasSuffix(lines[0], " pre x") || !strings.HasSuffix(lines[1], " create") {
		t.Fatalf("hook output %q", raw)
	}
	var got specs.State
	if err := json.Unmarshal([]byte(strings.TrimSuffix(lines[0], " pre x")), &got); err != nil {
		t.Fatal(err)
	}
	if got.ID != "c1" || got.Pid != 42 || got.Bundle != "/b" || got.Status != specs.StateCreating || got.Annotations["a"] != "b" {
		t.Errorf("state %+v", got)
	}
}

func TestFailures(t *testing.T) {
	one := 1
	for _, tc := range []struct {
		name string
		hook specs.Hook
		want string
	}{
		{"exit status", specs.Hook{Path: script(t, "echo broken >&2; exit 3\n")}, "broken"},
		{"missing", specs.Hook{Path: "/nonexistent/hook"}, "/nonexistent/hook"},
		{"timeout", specs.Hook{Path: script(t, "sleep 10\n"), Timeout: &one}, "deadline"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := CreateRuntime(context.Background(), &specs.Spec{Hooks: &specs.Hooks{CreateRuntime: []specs.Hook{tc.hook}}}, State{ID: "c"})
			if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), "createRuntime") {
				t.Fatalf("err %v, want one naming createRuntime and %q", err, tc.want)
			}
		})
	}
}

func TestPoststopRunsEveryHook(t *testing.T) {
	out := filepath.Join(t.TempDir(), "out")
	spec := &specs.Spec{Hooks: &specs.Hooks{Poststop: []specs.Hook{
		{Path: script(t, "exit 1\n")},
		{Path: script(t, "echo ran > "+out+"\n")},
	}}}
	if err := Poststop(context.Background(), spec, State{ID: "c"}); err == nil {
		t.Error("failing poststop hook not reported")
	}
	if _, err := os.Stat(out); err != nil {
		t.Errorf("second poststop hook did not run: %v", err)
	}
}

// Create hooks with poststop hooks to undo them leave those owed in the bundle until they run; without poststop
// hooks (or without create hooks) nothing is owed.
func TestPoststopOwed(t *testing.T) {
	ok := script(t, "exit 0\n")
	for _, tc := range []struct {
		name  string
		hooks specs.Hooks
		owed  bool
	}{
		{"create and poststop hooks", specs.Hooks{CreateRuntime: []specs.Hook{{Path: ok}}, Poststop: []specs.Hook{{Path: ok}}}, true},
		{"prestart and poststop hooks", specs.Hooks{Prestart: []specs.Hook{{Path: ok}}, Poststop: []specs.Hook{{Path: ok}}}, true},
		{"no poststop hook", specs.Hooks{CreateRuntime: []specs.Hook{{Path: ok}}}, false},
		{"no create hook", specs.Hooks{Poststop: []specs.Hook{{Path: ok}}}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			spec := &specs.Spec{Hooks: &tc.hooks}
			st := State{ID: "c1", Bundle: dir}
			if err := CreateRuntime(context.Background(), spec, st); err != nil {
				t.Fatal(err)
			}
			if by, owed := Owed(dir); owed != tc.owed || owed && by != os.Getpid() {
				t.Fatalf("owed after the create hooks: %v, by %d; want %v, by this process (%d)", owed, by, tc.owed, os.Getpid())
			}
			if err := Poststop(context.Background(), spec, st); err != nil {
				t.Fatal(err)
			}
			if _, owed := Owed(dir); owed {
				t.Error("still owed after the poststop hooks ran")
			}
		})
	}
}
