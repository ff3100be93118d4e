package integration

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kiln-runtime/kiln/runtime/container"
	"github.com/kiln-runtime/kiln/runtime/stdio"
)

// A VM that dies under running containers (QEMU killed) is noticed: each process is reported killed (137), the
// containers can be deleted, and the pod closes leaving nothing behind (the harness checks).
func TestDeadVMIsReported(t *testing.T) {
	v := newContainerVM(t, 256)
	c := v.create(t, "victim", v.spec("sleep", "1000"), "", stdio.IO{})
	ctx := testCtx(t, 2*time.Minute)
	if err := c.Start(ctx); err != nil {
		t.Fatal(err)
	}
	exec, err := c.Exec(ctx, "e1", v.spec("sleep", "1000").Process, stdio.IO{})
	if err != nil {
		// Seen once (make test on ba1b540): the exec found the init gone. Say how it ended, should it recur.
		wctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		e, werr := c.Wait(wctx)
		t.Fatalf("%v; the init: %+v, %v", err, e, werr)
	}
	pids := qemuProcesses(podID(t))
	if len(pids) != 1 {
		t.Fatalf("QEMU processes of the pod: %v, want one", pids)
	}
	pid, err := strconv.Atoi(pids[0])
	if err != nil {
		t.Fatal(err)
	}
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if e, err := c.Wait(ctx); err != nil || e.Status != 137 {
		t.Errorf("init after the VM died: %+v, %v, want status 137", e, err)
	}
	if e, err := exec.Wait(ctx); err != nil || e.Status != 137 {
		t.Errorf("exec after the VM died: %+v, %v, want status 137", e, err)
	}
}

// A VM the host's OOM killer ends is reported as such: an OOM kill of its running container before the container's
// exit (137), as a runc container's would be, so that kubelet says OOMKilled. The VM's cgroup's memory limit is
// lowered to just above what it uses, and the guest then touches more of its RAM.
func TestOOMKilledVMIsReported(t *testing.T) {
	v := newContainerVM(t, 256)
	c := v.create(t, "hog", v.spec("sh", "-c", "read go; head -c 150000000 /dev/zero | tail; echo survived"), "", stdio.IO{Stdin: strings.NewReader("go\n")})
	pids := qemuProcesses(podID(t))
	if len(pids) != 1 {
		t.Fatalf("QEMU processes of the pod: %v, want one", pids)
	}
	dir, v2 := memoryCgroup(t, pids[0])
	usage, limit := "memory.usage_in_bytes", "memory.limit_in_bytes"
	if v2 {
		usage, limit = "memory.current", "memory.max"
	}
	b, err := os.ReadFile(filepath.Join(dir, usage))
	if err != nil {
		t.Fatal(err)
	}
	used, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, limit), []byte(strconv.FormatInt(used+32<<20, 10)), 0); err != nil {
		t.Fatal(err)
	}
	ctx := testCtx(t, 3*time.Minute)
	if err := c.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if e, err := c.Wait(ctx); err != nil || e.Status != 137 {
		t.Errorf("the container after its VM ran out of memory: %+v, %v, want status 137", e, err)
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	oom := false
	for _, e := range v.events {
		oom = oom || e.Kind == container.EventOOM && e.ContainerID == "hog"
	}
	if !oom {
		t.Errorf("events %+v: want an OOM kill of the container", v.events)
	}
}

// memoryCgroup is the directory of process pid's memory cgroup (the VM's cgroup, for QEMU), and whether it is a
// cgroup v2 one.
func memoryCgroup(t *testing.T, pid string) (string, bool) {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("/proc", pid, "cgroup"))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		parts := strings.SplitN(line, ":", 3)
		if len(parts) != 3 {
			continue
		}
		if slices.Contains(strings.Split(parts[1], ","), "memory") {
			return filepath.Join("/sys/fs/cgroup/memory", parts[2]), false
		}
		if parts[0] == "0" && parts[1] == "" {
			return filepath.Join("/sys/fs/cgroup", parts[2]), true
		}
	}
	t.Fatalf("no memory cgroup in /proc/%s/cgroup:\n%s", pid, b)
	return "", false
}
