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

// A VM that can grow (hypervisor.memory_max_mib and vcpus_max, on by default) boots with memory_mib and vcpus and
// has its pod's limits added once it runs: a task with memory and CPU limits takes the spare of tasks without,
// and its VM grows to hold them; raising the task's limits in place (a task update, as Kubernetes' pod resize
// makes through CRI) grows it again; limits past the ceilings are refused with an error naming the key, and the
// task runs on.
func TestKilnVMGrows(t *testing.T) {
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
	k.runDetached(t, id, []string{"--privileged", "--memory-limit", strconv.Itoa(512 << 20), "--cpus", "1"}, sleeper...)
	k.waitStatus(t, id, "RUNNING")
	if log := k.logSince(t, 0); !strings.Contains(log, "the spare shim's warm VM runs the task\" container="+id) {
		t.Errorf("%s (limits of 512 MiB and a CPU) did not run in the spare of tasks without; containerd's log:\n%s", id, k.d.LogTail(40))
	}
	// Two vCPUs booted and one added.
	if online := strings.TrimSpace(k.ctr(t, "tasks", "exec", "--exec-id", "c1", id, "cat", "/sys/devices/system/cpu/online")); online != "0-2" {
		t.Errorf("the guest's online CPUs with a CPU limit of 1 on 2 vCPUs: %q, want 0-2", online)
	}
	// 256 MiB booted and 512 added: the guest's kernel has about 768 MiB (less what it keeps for itself).
	if total := k.guestMemTotal(t, id, "m1"); total < 700<<20 || total > 768<<20 {
		t.Errorf("guest MemTotal %d MiB with a 512 MiB limit on 256 MiB, want 700 to 768", total>>20)
	}

	if err := k.update(t, id, 1536<<20, 4); err != nil {
		t.Fatalf("raise the limits to 1536 MiB and 4 CPUs: %v", err)
	}
	if online := strings.TrimSpace(k.ctr(t, "tasks", "exec", "--exec-id", "c2", id, "cat", "/sys/devices/system/cpu/online")); online != "0-5" {
		t.Errorf("the guest's online CPUs with the CPU limit raised to 4: %q, want 0-5", online)
	}
	// And the container's processes may run on them (its cgroup's cpuset takes in CPUs as they come online).
	if n := strings.TrimSpace(k.ctr(t, "tasks", "exec", "--exec-id", "nproc", id, "nproc")); n != "6" {
		t.Errorf("nproc in the container after the growth: %q, want 6", n)
	}
	if total := k.guestMemTotal(t, id, "m2"); total < 1700<<20 || total > 1792<<20 {
		t.Errorf("guest MemTotal %d MiB with the limit raised to 1536 MiB, want 1700 to 1792", total>>20)
	}
	// The guest's ceiling on threads grew with its memory (the kernel sets it at boot from an eighth of the RAM
	// there is, 16 KiB a thread: 2048 in 256 MiB), so the pod may run as many threads as a runc pod of that size,
	// and no more: past it, the memory their stacks take (session 41's first version lifted the ceiling for good).
	if n, err := strconv.Atoi(strings.TrimSpace(k.ctr(t, "tasks", "exec", "--exec-id", "threads", id, "cat", "/proc/sys/kernel/threads-max"))); err != nil || n < 12000 || n > 14400 {
		t.Errorf("the guest's threads-max with about 1.7 GiB: %d (%v), want 12000 to 14400 (an eighth of the RAM for 16 KiB stacks)", n, err)
	}
	var m struct {
		Memory struct {
			UsageLimit int64 `json:"usage_limit"`
		} `json:"memory"`
	}
	if out := k.ctr(t, "tasks", "metrics", "--format", "json", id); json.Unmarshal([]byte(out), &m) != nil || m.Memory.UsageLimit != 1536<<20 {
		t.Errorf("the container's memory limit in the guest: %d, want %d; metrics:\n%s", m.Memory.UsageLimit, 1536<<20, out)
	}
	// The host accounts the adopted VM to the task: its QEMU is in the task's cgroup.
	if dir := controllerCgroupOf(t, k.podQEMU(t, id), "memory"); !strings.HasSuffix(dir, "/kiln-test/"+id) {
		t.Errorf("the adopted VM's QEMU is in memory cgroup %s, want the task's (/kiln-test/%s)", dir, id)
	}
	// The new memory is usable: a tmpfs in the guest takes 1 GiB more than the VM booted with.
	fill := "mkdir -p /tmp/fill && mount -t tmpfs -o size=1200m tmpfs /tmp/fill && dd if=/dev/zero of=/tmp/fill/f bs=1M count=1024 2>&1 && echo filled"
	if out, errOut, code := k.ctrCode(t, nil, "tasks", "exec", "--exec-id", "fill", id, "sh", "-c", fill); code != 0 || !strings.Contains(out, "filled") {
		t.Errorf("filling 1 GiB of the grown guest's memory: exit %d, stdout %q, stderr %s", code, out, errOut)
	}

	if err := k.update(t, id, 64<<30, 0); err == nil || !strings.Contains(err.Error(), "memory_max_mib") {
		t.Errorf("a 64 GiB limit past the default ceiling: %v; want an error naming hypervisor.memory_max_mib", err)
	}
	if err := k.update(t, id, 0, 16); err == nil || !strings.Contains(err.Error(), "vcpus_max") {
		t.Errorf("a limit of 16 CPUs past the default ceiling: %v; want an error naming hypervisor.vcpus_max", err)
	}
	if got := k.taskStatus(t, id); got != "RUNNING" {
		t.Errorf("after the refused update the task is %s, want RUNNING", got)
	}
	if log := k.logSince(t, 0); strings.Count(log, "the VM's memory grew") < 2 || strings.Count(log, "the VM's vCPUs grew") < 2 {
		t.Errorf("the shim did not log two growths of the VM's memory and vCPUs; containerd's log:\n%s", k.d.LogTail(40))
	}
}

// update sets task id's memory limit (bytes) and CPU limit (CPUs), each when not 0, through its containerd task's
// Update, which `ctr` has no command for.
func (k *kilnEnv) update(t *testing.T, id string, memory int64, cpus int64) error {
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
	var r specs.LinuxResources
	if memory != 0 {
		r.Memory = &specs.LinuxMemory{Limit: &memory}
	}
	if cpus != 0 {
		quota, period := cpus*100000, uint64(100000)
		r.CPU = &specs.LinuxCPU{Quota: &quota, Period: &period}
	}
	return task.Update(ctx, client.WithResources(&r))
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
