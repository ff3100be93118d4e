package agent

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestGuestThreads(t *testing.T) {
	// A fake hierarchy: files the kernel would have, plain files here.
	setup := func(t *testing.T, threadsMax string) (*GuestThreads, string) {
		t.Helper()
		dir := t.TempDir()
		root := filepath.Join(dir, "cgroup")
		if err := os.Mkdir(root, 0o755); err != nil {
			t.Fatal(err)
		}
		max := filepath.Join(dir, "threads-max")
		if err := os.WriteFile(max, []byte(threadsMax), 0o644); err != nil {
			t.Fatal(err)
		}
		return &GuestThreads{ThreadsMax: max, Containers: filepath.Join(root, "kiln")}, root
	}
	read := func(t *testing.T, p string) string {
		t.Helper()
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}

	t.Run("reserve", func(t *testing.T) {
		g, root := setup(t, "2048\n")
		if err := g.Reserve(); err != nil {
			t.Fatal(err)
		}
		if got := read(t, filepath.Join(root, "cgroup.subtree_control")); got != "+pids" {
			t.Errorf("the parent's subtree_control got %q, want +pids", got)
		}
		if got := read(t, filepath.Join(g.Containers, "pids.max")); got != "1792" {
			t.Errorf("the containers' pids.max is %q, want 2048 less %d", got, ThreadsReserved)
		}
		// Again, with the cgroup there.
		if err := g.Reserve(); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("raise", func(t *testing.T) {
		g, _ := setup(t, "2048\n")
		if err := g.Raise(); err != nil {
			t.Fatal(err)
		}
		// A kernel lowers what is written to what its RAM allows; the fake keeps it.
		if got := read(t, g.ThreadsMax); got != maxThreadsAsked {
			t.Errorf("threads-max is %q, want %s written", got, maxThreadsAsked)
		}
		if got := read(t, filepath.Join(g.Containers, "pids.max")); got != "1073741567" {
			t.Errorf("the containers' pids.max is %q after the raise, want threads-max less %d", got, ThreadsReserved)
		}
	})
	for _, bad := range []string{"", "many", "512"} {
		t.Run("threads-max "+bad, func(t *testing.T) {
			g, _ := setup(t, bad)
			err := g.Reserve()
			if err == nil || !strings.Contains(err.Error(), "kernel.threads-max") {
				t.Fatalf("Reserve with threads-max %q = %v, want an error naming kernel.threads-max", bad, err)
			}
			if _, err := os.Stat(g.Containers); err == nil {
				t.Error("the containers' cgroup made though no limit could be set")
			}
		})
	}
}
