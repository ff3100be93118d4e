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

func TestRefusesBadPaths(t *testing.T) {
	for _, p := range []string{"relative/path", "/", "kubepods.slice:cri-containerd", "kubepods:cri-containerd:abc", "a--b.slice:x:y", "a.slice:x:", "a.slice:x:y/z"} {
		if _, err := Enter(p, os.Getpid()); err == nil {
			t.Errorf("%q accepted", p)
		}
	}
}

// A systemd cgroup path names the scope's cgroup in the slice's, as systemd lays them out.
func TestSystemdPath(t *testing.T) {
	for in, want := range map[string]string{
		"kubepods-burstable-pod1.slice:cri-containerd:abc": "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice/cri-containerd-abc.scope",
		"kubepods.slice:cri-containerd:abc":                "/kubepods.slice/cri-containerd-abc.scope",
		":cri-containerd:abc":                              "/system.slice/cri-containerd-abc.scope",
		"machine.slice::abc":                               "/machine.slice/-abc.scope",
		"kubepods.slice:x:kubepods-pod2.slice":             "/kubepods.slice/kubepods-pod2.slice",
		"-.slice:cri-containerd:abc":                       "/cri-containerd-abc.scope",
	} {
		got, err := SystemdPath(in)
		if err != nil || got != want {
			t.Errorf("SystemdPath(%q) = %q, %v; want %q", in, got, err, want)
		}
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
