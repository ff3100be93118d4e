package hostcgroup

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/containerd/cgroups/v3"
	"github.com/containerd/cgroups/v3/cgroup1"
)

func TestEnterAndLeave(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to create cgroups")
	}
	sleeper := exec.Command("sleep", "60")
	if err := sleeper.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = sleeper.Process.Kill(); _ = sleeper.Wait() }()
	pid := sleeper.Process.Pid
	before := cgroupOf(t, pid)
	parent := fmt.Sprintf("/kiln-hostcgroup-test-%d", os.Getpid())
	p := parent + "/pod"
	t.Cleanup(func() {
		// The parent is left, as runc leaves a container's: whoever made the pod's cgroup removes it.
		if cgroups.Mode() == cgroups.Unified {
			_ = os.Remove("/sys/fs/cgroup" + parent)
		} else if cg, err := cgroup1.Load(cgroup1.StaticPath(parent)); err == nil {
			_ = cg.Delete()
		}
	})
	g, err := Enter(p, pid)
	if err != nil {
		t.Fatal(err)
	}
	if now := cgroupOf(t, pid); !strings.Contains(now, p) {
		t.Errorf("process is in %q, want %s", now, p)
	}
	if err := g.Leave(); err != nil {
		t.Fatal(err)
	}
	if now := cgroupOf(t, pid); now != before {
		t.Errorf("process is in %q after Leave, was in %q", now, before)
	}
	if strings.Contains(readFile(t, "/proc/self/mountinfo"), "cgroup2") {
		if _, err := os.Stat("/sys/fs/cgroup" + p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("cgroup %s left: %v", p, err)
		}
	} else if _, err := os.Stat("/sys/fs/cgroup/memory" + p); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("cgroup %s left: %v", p, err)
	}
}

func TestRefusesSystemdAndRelativePaths(t *testing.T) {
	for _, p := range []string{"kubepods.slice:cri-containerd:abc", "relative/path", "/"} {
		if _, err := Enter(p, os.Getpid()); err == nil {
			t.Errorf("%q accepted", p)
		}
	}
	if _, err := Enter("a.slice:b:c", os.Getpid()); !errors.Is(err, ErrSystemdPath) {
		t.Errorf("systemd path: %v", err)
	}
}

func cgroupOf(t *testing.T, pid int) string { return readFile(t, fmt.Sprintf("/proc/%d/cgroup", pid)) }

func readFile(t *testing.T, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// The group counts the OOM kills of its processes from Enter on.
func TestOOMKills(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to create cgroups")
	}
	hog := exec.Command("/bin/sh", "-c", `read go; x=$(head -c 64000000 /dev/zero | tr '\0' a); echo survived`)
	in, err := hog.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	var out strings.Builder
	hog.Stdout = &out
	if err := hog.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = hog.Process.Kill(); _ = hog.Wait() }()
	p := fmt.Sprintf("/kiln-hostcgroup-oom-test-%d", os.Getpid())
	limit := "/sys/fs/cgroup" + p + "/memory.max"
	if cgroups.Mode() != cgroups.Unified {
		limit = "/sys/fs/cgroup/memory" + p + "/memory.limit_in_bytes"
	}
	g, err := Enter(p, hog.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = g.Leave()
		_ = g.delete()
	})
	if err := os.WriteFile(limit, []byte(fmt.Sprint(16<<20)), 0); err != nil {
		t.Fatal(err)
	}
	if n, err := g.OOMKills(); err != nil || n != 0 {
		t.Fatalf("OOMKills before any = %d, %v; want 0", n, err)
	}
	if _, err := in.Write([]byte("go\n")); err != nil {
		t.Fatal(err)
	}
	_ = hog.Wait()
	if strings.Contains(out.String(), "survived") {
		t.Fatal("the program outgrew its cgroup's limit and was not killed")
	}
	if n, err := g.OOMKills(); err != nil || n == 0 {
		t.Errorf("OOMKills after the program was killed = %d, %v; want 1 or more", n, err)
	}
}
