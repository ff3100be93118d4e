package agent

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestGuestThreads(t *testing.T) {
	// A fake /proc and cgroup hierarchy: files the kernel would have, plain files here.
	setup := func(t *testing.T, threadsMax, pidMax, memTotal string) (*GuestThreads, string) {
		t.Helper()
		dir := t.TempDir()
		root := filepath.Join(dir, "cgroup")
		if err := os.Mkdir(root, 0o755); err != nil {
			t.Fatal(err)
		}
		g := &GuestThreads{
			ThreadsMax: filepath.Join(dir, "threads-max"),
			PidMax:     filepath.Join(dir, "pid_max"),
			Meminfo:    filepath.Join(dir, "meminfo"),
			Containers: filepath.Join(root, "kiln"),
		}
		for p, v := range map[string]string{g.ThreadsMax: threadsMax, g.PidMax: pidMax, g.Meminfo: "MemFree:  1000 kB\nMemTotal: " + memTotal + "\n"} {
			if err := os.WriteFile(p, []byte(v), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		return g, root
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
		g, root := setup(t, "2048\n", "32768\n", "262144 kB")
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
	t.Run("pid_max is the lower", func(t *testing.T) {
		g, _ := setup(t, "65536\n", "32768\n", "8388608 kB")
		if err := g.Reserve(); err != nil {
			t.Fatal(err)
		}
		if got := read(t, filepath.Join(g.Containers, "pids.max")); got != "32512" {
			t.Errorf("the containers' pids.max is %q, want pid_max 32768 less %d", got, ThreadsReserved)
		}
	})
	t.Run("raise", func(t *testing.T) {
		// 1 GiB now: an eighth of it for 16 KiB stacks.
		g, _ := setup(t, "2048\n", "32768\n", "1048576 kB")
		if err := g.Raise(); err != nil {
			t.Fatal(err)
		}
		if got := read(t, g.ThreadsMax); got != "8192" {
			t.Errorf("threads-max is %q, want 8192 for 1 GiB", got)
		}
		if got := read(t, filepath.Join(g.Containers, "pids.max")); got != "7936" {
			t.Errorf("the containers' pids.max is %q after the raise, want 8192 less %d", got, ThreadsReserved)
		}
	})
	t.Run("never lowers", func(t *testing.T) {
		g, _ := setup(t, "9000\n", "32768\n", "262144 kB")
		if err := g.Raise(); err != nil {
			t.Fatal(err)
		}
		if got := read(t, g.ThreadsMax); got != "9000\n" {
			t.Errorf("threads-max is %q, want it left at 9000", got)
		}
	})
	for _, bad := range []struct{ name, threads, pids, mem string }{
		{"empty threads-max", "", "32768", "262144 kB"},
		{"threads-max not a number", "many", "32768", "262144 kB"},
		{"too few threads", "512", "32768", "262144 kB"},
		{"too few pids", "2048", "300", "262144 kB"},
	} {
		t.Run(bad.name, func(t *testing.T) {
			g, _ := setup(t, bad.threads, bad.pids, bad.mem)
			if err := g.Reserve(); err == nil {
				t.Fatal("Reserve succeeded")
			}
			if _, err := os.Stat(g.Containers); err == nil {
				t.Error("the containers' cgroup made though no limit could be set")
			}
		})
	}
	t.Run("meminfo without MemTotal", func(t *testing.T) {
		g, _ := setup(t, "2048", "32768", "lots")
		if err := g.Raise(); err == nil || !strings.Contains(err.Error(), "MemTotal") {
			t.Fatalf("Raise = %v, want an error naming MemTotal", err)
		}
	})
}
