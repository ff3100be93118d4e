package containerd

import (
	"context"
	"encoding/json"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// A VM that can grow (hypervisor.memory_max_mib, on by default) boots with memory_mib and has its pod's memory
// limit added once it runs: a task with a memory limit takes the spare of tasks without one, and its VM grows to
// hold the limit; raising the task's limit in place (`ctr task update`, as Kubernetes' pod resize does through CRI)
// grows it again; a limit past the ceiling is refused with an error naming memory_max_mib, and the task runs on.
func TestKilnMemoryGrows(t *testing.T) {
	k := startKiln(t)
	k.spareConfig(t)
	addr := k.d.Address
	if out, errOut, code := k.run(t, "--rm", BusyboxRef, "kiln-grow-0", "true"); code != 0 {
		t.Fatalf("first run: exit %d, stdout %q, stderr %s", code, out, errOut)
	}
	if !WaitSpare(addr, 3*time.Minute) {
		t.Fatalf("no spare shim became ready for %s", addr)
	}
	const id = "kiln-grow-1"
	// Privileged, to mount a tmpfs below.
	k.runDetached(t, id, []string{"--privileged", "--memory-limit", strconv.Itoa(512 << 20)}, sleeper...)
	k.waitStatus(t, id, "RUNNING")
	if log := k.logSince(t, 0); !strings.Contains(log, "the spare shim's warm VM runs the task\" container="+id) {
		t.Errorf("%s (a 512 MiB limit) did not run in the spare of tasks without one; containerd's log:\n%s", id, k.d.LogTail(40))
	}
	// 256 MiB booted and 512 added: the guest's kernel has about 768 MiB (less what it keeps for itself).
	if total := k.guestMemTotal(t, id, "m1"); total < 700<<20 || total > 768<<20 {
		t.Errorf("guest MemTotal %d MiB with a 512 MiB limit on 256 MiB, want 700 to 768", total>>20)
	}

	if err := k.updateMemory(t, id, 1536<<20); err != nil {
		t.Fatalf("raise the limit to 1536 MiB: %v", err)
	}
	if total := k.guestMemTotal(t, id, "m2"); total < 1700<<20 || total > 1792<<20 {
		t.Errorf("guest MemTotal %d MiB with the limit raised to 1536 MiB, want 1700 to 1792", total>>20)
	}
	var m struct {
		Memory struct {
			UsageLimit int64 `json:"usage_limit"`
		} `json:"memory"`
	}
	if out := k.ctr(t, "tasks", "metrics", "--format", "json", id); json.Unmarshal([]byte(out), &m) != nil || m.Memory.UsageLimit != 1536<<20 {
		t.Errorf("the container's memory limit in the guest: %d, want %d; metrics:\n%s", m.Memory.UsageLimit, 1536<<20, out)
	}
	// The new memory is usable: a tmpfs in the guest takes 1 GiB more than the VM booted with.
	fill := "mkdir -p /tmp/fill && mount -t tmpfs -o size=1200m tmpfs /tmp/fill && dd if=/dev/zero of=/tmp/fill/f bs=1M count=1024 2>&1 && echo filled"
	if out, errOut, code := k.ctrCode(t, nil, "tasks", "exec", "--exec-id", "fill", id, "sh", "-c", fill); code != 0 || !strings.Contains(out, "filled") {
		t.Errorf("filling 1 GiB of the grown guest's memory: exit %d, stdout %q, stderr %s", code, out, errOut)
	}

	if err := k.updateMemory(t, id, 64<<30); err == nil || !strings.Contains(err.Error(), "memory_max_mib") {
		t.Errorf("a 64 GiB limit past the default ceiling: %v; want an error naming hypervisor.memory_max_mib", err)
	}
	if got := k.taskStatus(t, id); got != "RUNNING" {
		t.Errorf("after the refused update the task is %s, want RUNNING", got)
	}
	if log := k.logSince(t, 0); strings.Count(log, "the VM's memory grew") < 2 {
		t.Errorf("the shim did not log two growths of the VM's memory; containerd's log:\n%s", k.d.LogTail(40))
	}
}

// updateMemory sets task id's memory limit (its containerd task's Update, which `ctr` has no command for).
func (k *kilnEnv) updateMemory(t *testing.T, id string, limit int64) error {
	t.Helper()
	ctx, cancel := context.WithTimeout(namespaces.WithNamespace(context.Background(), Namespace), time.Minute)
	defer cancel()
	c, err := client.New(k.d.Address, client.WithDefaultNamespace(Namespace))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctr, err := c.LoadContainer(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	task, err := ctr.Task(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	return task.Update(ctx, client.WithResources(&specs.LinuxResources{Memory: &specs.LinuxMemory{Limit: &limit}}))
}

var memTotal = regexp.MustCompile(`(?m)^MemTotal:\s+(\d+) kB$`)

// guestMemTotal is the guest kernel's MemTotal in bytes, read in container id through an exec.
func (k *kilnEnv) guestMemTotal(t *testing.T, id, execID string) int64 {
	t.Helper()
	out := k.ctr(t, "tasks", "exec", "--exec-id", execID, id, "cat", "/proc/meminfo")
	m := memTotal.FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("no MemTotal in the guest's /proc/meminfo:\n%s", out)
	}
	kb, _ := strconv.ParseInt(m[1], 10, 64)
	return kb << 10
}
