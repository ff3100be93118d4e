package cri

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"github.com/kiln-runtime/kiln/integration/containerd"
)

// startEnv starts a harness containerd with CRI and the given handlers, and stops it when the test ends,
// failing the test on leftovers (pods, containers, shims).
func startEnv(t *testing.T, opts Options) *Env {
	t.Helper()
	containerd.RequireRoot(t, "CRI")
	root := containerd.RepoRoot(t)
	opts.RepoRoot = root
	opts.ToolsDir = filepath.Join(root, "_output", "tools", "bin")
	opts.KilnAssets = filepath.Join(root, "_output", "share", "kiln")
	opts.Debug = true
	// Building containerd, runc, crictl and critest the first time takes minutes on a loaded 2-core machine.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	e, err := Start(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			kept, err := e.Daemon.KeepLogs(t.Name(), e.KilnStateDir())
			t.Logf("containerd log (tail):\n%s\ncontainerd's whole log and the VM consoles are kept in %s (%v)", e.Daemon.LogTail(80), kept, err)
		}
		if err := e.Stop(context.Background()); err != nil {
			t.Errorf("stop CRI harness: %v", err)
		}
	})
	return e
}

// crictl runs crictl and fails the test on error.
func (e *Env) crictl(t *testing.T, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	out, err := e.Crictl(ctx, args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}
