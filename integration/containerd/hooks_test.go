package containerd

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/containers"
	"github.com/containerd/containerd/v2/pkg/cio"
	"github.com/containerd/containerd/v2/pkg/oci"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// TestKilnPoststartHookFailure: a poststart hook that fails fails the task's start and stops the container, as
// the runtime spec asks and runc does (Kiln used to log it and leave the container running); the container's
// exit is reported as a kill, and its delete runs the poststop hooks.
func TestKilnPoststartHookFailure(t *testing.T) {
	k := startKiln(t)
	const id = "poststart-fails"
	dir := t.TempDir()
	stopped := filepath.Join(dir, "poststop")
	withHooks := func(_ context.Context, _ oci.Client, _ *containers.Container, s *oci.Spec) error {
		s.Hooks = &specs.Hooks{
			Poststart: []specs.Hook{{Path: "/bin/sh", Args: []string{"sh", "-c", "echo refused >&2; exit 3"}}},
			Poststop:  []specs.Hook{{Path: "/bin/sh", Args: []string{"sh", "-c", "echo ran > " + stopped}}},
		}
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	ctr := k.newContainer(ctx, t, id, oci.WithProcessArgs("sleep", "3600"), withHooks)
	task, err := ctr.NewTask(ctx, cio.NullIO)
	if err != nil {
		t.Fatal(err)
	}
	exited, err := task.Wait(ctx)
	if err != nil {
		t.Fatal(err)
	}
	err = task.Start(ctx)
	if err == nil || !strings.Contains(err.Error(), "poststart") {
		t.Fatalf("start with a failing poststart hook = %v, want an error naming the hook", err)
	}
	select {
	case st := <-exited:
		if st.ExitCode() != 137 {
			t.Errorf("the container exited with %d, want 137 (killed)", st.ExitCode())
		}
	case <-ctx.Done():
		t.Fatal("the container runs on after its poststart hook failed")
	}
	if _, err := task.Delete(ctx); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(stopped); err != nil || strings.TrimSpace(string(b)) != "ran" {
		t.Errorf("poststop hook at the delete: %q, %v", b, err)
	}
}
