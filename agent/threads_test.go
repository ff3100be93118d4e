package agent

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

func TestGuestThreads(t *testing.T) {
	// A fake /proc, /sys and cgroup hierarchy: files the kernel would have, plain files here. Two possible CPUs
	// keep 256 + 2*16 = 288 threads back.
	const reserved = threadsReservedBase + 2*threadsReservedPerCPU
	setup := func(t *testing.T, threadsMax, pidMax, memTotal string) (*GuestThreads, string) {
		t.Helper()
		dir := t.TempDir()
		root := filepath.Join(dir, "cgroup")
		if err := os.Mkdir(root, 0o755); err != nil {
			t.Fatal(err)
		}
		g := &GuestThreads{
			ThreadsMax:   filepath.Join(dir, "threads-max"),
			PidMax:       filepath.Join(dir, "pid_max"),
			Meminfo:      filepath.Join(dir, "meminfo"),
			PossibleCPUs: filepath.Join(dir, "possible"),
			Containers:   filepath.Join(root, "kiln"),
		}
		for p, v := range map[string]string{
			g.ThreadsMax: threadsMax, g.PidMax: pidMax, g.PossibleCPUs: "0-1\n",
			g.Meminfo: "MemFree:  1000 kB\nMemTotal: " + memTotal + "\n",
		} {
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
		return strings.TrimSpace(string(b))
	}
	limit := func(n int) string { return strconv.Itoa(n - reserved) }

	t.Run("reserve", func(t *testing.T) {
		g, root := setup(t, "2048\n", "32768\n", "262144 kB")
		if err := g.Reserve(); err != nil {
			t.Fatal(err)
		}
		if got := read(t, filepath.Join(root, "cgroup.subtree_control")); got != "+pids" {
			t.Errorf("the parent's subtree_control got %q, want +pids", got)
		}
		if got := read(t, filepath.Join(g.Containers, "pids.max")); got != limit(2048) {
			t.Errorf("the containers' pids.max is %q, want 2048 less %d", got, reserved)
		}
		// As a host's systemd does: the kernel's default would bind before threads-max in a guest of some GiB.
		if got := read(t, g.PidMax); got != "4194304" {
			t.Errorf("pid_max is %q, want 4194304", got)
		}
		// Again, with the cgroup there.
		if err := g.Reserve(); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("pid_max the lower", func(t *testing.T) {
		g, _ := setup(t, "8000000\n", "4194304\n", "8388608 kB")
		if err := g.Reserve(); err != nil {
			t.Fatal(err)
		}
		// The kernel hands out no pid below 300 once its counter wrapped.
		if got := read(t, filepath.Join(g.Containers, "pids.max")); got != limit(4194304-300) {
			t.Errorf("the containers' pids.max is %q, want pid_max less 300 less %d", got, reserved)
		}
	})
	t.Run("raise", func(t *testing.T) {
		// 1 GiB now: an eighth of it for 16 KiB stacks.
		g, _ := setup(t, "2048\n", "32768\n", "1048576 kB")
		if err := g.Reserve(); err != nil {
			t.Fatal(err)
		}
		if err := g.Raise(); err != nil {
			t.Fatal(err)
		}
		if got := read(t, g.ThreadsMax); got != "8192" {
			t.Errorf("threads-max is %q, want 8192 for 1 GiB", got)
		}
		if got := read(t, filepath.Join(g.Containers, "pids.max")); got != limit(8192) {
			t.Errorf("the containers' pids.max is %q after the raise, want 8192 less %d", got, reserved)
		}
	})
	t.Run("raise before reserve", func(t *testing.T) {
		// Memory added before the guest's setup mounted the cgroup hierarchy: the ceiling is raised, and the
		// containers' share waits for Reserve, which reads it.
		g, _ := setup(t, "2048\n", "32768\n", "1048576 kB")
		if err := g.Raise(); err != nil {
			t.Fatal(err)
		}
		if _, err := os.Stat(g.Containers); err == nil {
			t.Error("Raise made the containers' cgroup before Reserve")
		}
		if err := g.Reserve(); err != nil {
			t.Fatal(err)
		}
		if got := read(t, filepath.Join(g.Containers, "pids.max")); got != limit(8192) {
			t.Errorf("the containers' pids.max is %q, want 8192 less %d", got, reserved)
		}
	})
	t.Run("small guest of many vCPUs", func(t *testing.T) {
		// 256 MiB with vcpus_max = 64: 256 + 64*16 = 1280 kept would leave the containers nothing; they get half.
		g, _ := setup(t, "1880\n", "32768\n", "240640 kB")
		if err := os.WriteFile(g.PossibleCPUs, []byte("0-63\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := g.Reserve(); err != nil {
			t.Fatal(err)
		}
		if got := read(t, filepath.Join(g.Containers, "pids.max")); got != "940" {
			t.Errorf("the containers' pids.max is %q, want half of 1880", got)
		}
	})
	t.Run("never lowers", func(t *testing.T) {
		g, _ := setup(t, "9000\n", "32768\n", "262144 kB")
		if err := g.Raise(); err != nil {
			t.Fatal(err)
		}
		if got := read(t, g.ThreadsMax); got != "9000" {
			t.Errorf("threads-max is %q, want it left at 9000", got)
		}
	})
	for _, bad := range []struct{ name, threads, pids string }{
		{"empty threads-max", "", "32768"},
		{"threads-max not a number", "many", "32768"},
		{"too few threads", "40", "32768"},
	} {
		t.Run(bad.name, func(t *testing.T) {
			g, _ := setup(t, bad.threads, bad.pids, "262144 kB")
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
