package containerd

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/kiln-runtime/kiln/config"
	"github.com/kiln-runtime/kiln/runtime/hostcgroup"
	"github.com/kiln-runtime/kiln/runtime/spare"
)

// spareConfig gives k's tasks a Kiln configuration with spares on, whatever the defaults (a suite run with
// fast_start = "off" keeps its spare tests). startKiln's leftover check stops the spare (StopSpare) and fails the
// test if it leaves anything.
func (k *kilnEnv) spareConfig(t *testing.T) {
	t.Helper()
	cfg, err := k.d.KilnConfig(k.assets, "[hypervisor]\nfast_start = \"template\"\nspare = true\n")
	if err != nil {
		t.Fatal(err)
	}
	k.cfg = cfg
}

// With hypervisor.spare, a task's shim starts a spare shim for the next task of its containerd, of the shape of its
// own task's VM, and the next task's shim is that spare: its VM was booted and warmed before the task came. The
// container runs there as in any VM. A task of another shape is declined by the spare at `start` and boots its
// own VM; the spare waits on for a task it fits, until it has declined three in a row, when it leaves for a spare
// of theirs. A spare told to stop (SIGTERM) stops its VM and leaves nothing behind.
func TestKilnSpareShim(t *testing.T) {
	k := startKiln(t)
	// VMs that keep the vCPUs they boot with: a CPU limit grows each task's VM by a vCPU, and the spares are of
	// that shape. (A VM that can grow takes tasks of every size: TestKilnVMGrows.)
	cfg, err := k.d.KilnConfig(k.assets, "[hypervisor]\nfast_start = \"template\"\nspare = true\nvcpus_max = 0\n")
	if err != nil {
		t.Fatal(err)
	}
	k.cfg = cfg
	addr := k.d.Address
	limit := []string{"--cpus", "1"}

	out, errOut, code := k.run(t, append(limit, "--rm", BusyboxRef, "kiln-spare-1", "echo", "first")...)
	if code != 0 || strings.TrimSpace(out) != "first" {
		t.Fatalf("first run: exit %d, stdout %q, stderr %s", code, out, errOut)
	}
	if !WaitSpare(addr, 3*time.Minute) {
		t.Fatalf("no spare shim became ready for %s", addr)
	}
	out, errOut, code = k.run(t, append(limit, "--rm", BusyboxRef, "kiln-spare-2", "sh", "-c", "echo second; exit 3")...)
	if code != 3 || strings.TrimSpace(out) != "second" {
		t.Fatalf("run in the spare's VM: exit %d (want 3), stdout %q, stderr %s", code, out, errOut)
	}
	if log := k.logSince(t, 0); !strings.Contains(log, "the spare shim's warm VM runs the task\" container=kiln-spare-2") {
		t.Errorf("kiln-spare-2 did not run in the spare's VM; containerd's log:\n%s", k.d.LogTail(40))
	}
	// The second task's shim started the next spare, of the same shape. A task without the limit does not fit
	// it: the spare declines it at `start`, and the task's own shim boots its VM, at the usual priority.
	if !WaitSpare(addr, 3*time.Minute) {
		t.Fatalf("the second task's shim started no spare for %s", addr)
	}
	waiting, _ := spareOf(addr)
	const third = "kiln-spare-3"
	k.runDetached(t, third, nil, sleeper...)
	k.waitStatus(t, third, "RUNNING")
	if b, err := os.ReadFile(waiting.Slot + ".log"); err != nil || !strings.Contains(string(b), "asks for another VM size") {
		t.Errorf("%s (no CPU limit) was not declined by the spare of the limited tasks' shape; the spare's log (%v):\n%s", third, err, b)
	}
	if sp, ok := spareOf(addr); !ok || sp.Pid != waiting.Pid || !sp.Ready {
		t.Fatalf("the spare that declined %s is gone (%+v, %v)", third, sp, ok)
	}
	qemus := qemusIn(filepath.Join(k.d.StateDir(), k.vmOf(t, third)))
	if len(qemus) == 0 {
		t.Fatalf("no QEMU runs %s", third)
	}
	for _, pid := range qemus {
		if n := niceOf(t, pid); n != 0 {
			t.Errorf("QEMU %d of %s runs at nice %d, want 0", pid, third, n)
		}
	}
	// The next task of the spare's shape finds it waiting.
	out, errOut, code = k.run(t, append(limit, "--rm", BusyboxRef, "kiln-spare-4", "echo", "fourth")...)
	if code != 0 || strings.TrimSpace(out) != "fourth" {
		t.Fatalf("fourth run: exit %d, stdout %q, stderr %s", code, out, errOut)
	}
	if log := k.logSince(t, 0); !strings.Contains(log, "the spare shim's warm VM runs the task\" container=kiln-spare-4") {
		t.Errorf("kiln-spare-4 did not run in the spare that declined %s; containerd's log:\n%s", third, k.d.LogTail(40))
	}

	// Tasks without the limit, three in a row: the limited tasks' spare declines them and then leaves, and the
	// third's shim starts a spare of their shape, which the next one takes.
	if !WaitSpare(addr, 3*time.Minute) {
		t.Fatalf("kiln-spare-4's shim started no spare for %s", addr)
	}
	limited, _ := spareOf(addr)
	for i := 5; i < 8; i++ {
		id := fmt.Sprint("kiln-spare-", i)
		if out, errOut, code := k.run(t, "--rm", BusyboxRef, id, "true"); code != 0 {
			t.Fatalf("%s: exit %d, stdout %q, stderr %s", id, code, out, errOut)
		}
	}
	if !WaitSpare(addr, 3*time.Minute) {
		t.Fatalf("no spare of the unlimited tasks' shape for %s", addr)
	}
	if sp, _ := spareOf(addr); sp.Pid == limited.Pid {
		t.Fatalf("the limited tasks' spare %d still waits after declining three tasks in a row", sp.Pid)
	}
	out, errOut, code = k.run(t, "--rm", BusyboxRef, "kiln-spare-8", "echo", "eighth")
	if code != 0 || strings.TrimSpace(out) != "eighth" {
		t.Fatalf("eighth run: exit %d, stdout %q, stderr %s", code, out, errOut)
	}
	if log := k.logSince(t, 0); !strings.Contains(log, "the spare shim's warm VM runs the task\" container=kiln-spare-8") {
		t.Errorf("kiln-spare-8 did not run in the spare of its shape; containerd's log:\n%s", k.d.LogTail(40))
	}
}

// With hypervisor.spare_pool, the first task's shim fills the pool: that many spares wait, each in a slot and a VM
// of its own. Tasks started together each take one, none boots a VM, and their shims fill the pool again.
// startKiln's leftover check stops every spare (StopSpare) and fails the test if any leaves anything.
func TestKilnSparePool(t *testing.T) {
	k := startKiln(t)
	cfg, err := k.d.KilnConfig(k.assets, "[hypervisor]\nfast_start = \"template\"\nspare = true\nspare_pool = 2\n")
	if err != nil {
		t.Fatal(err)
	}
	k.cfg = cfg
	addr := k.d.Address
	if out, errOut, code := k.run(t, "--rm", BusyboxRef, "kiln-pool-0", "true"); code != 0 {
		t.Fatalf("first run: exit %d, stdout %q, stderr %s", code, out, errOut)
	}
	if !WaitSpares(addr, 2, 4*time.Minute) {
		t.Fatalf("the pool of %s holds %+v, want two ready spares", addr, sparesOf(addr))
	}
	first := sparesOf(addr)
	if len(first) != 2 || first[0].Slot == first[1].Slot || first[0].Pid == first[1].Pid {
		t.Fatalf("pool = %+v, want two spares in two slots", first)
	}
	if a, b := childQEMU(t, first[0].Pid), childQEMU(t, first[1].Pid); a == b {
		t.Fatalf("the two spares share QEMU %d", a)
	} else if ua, ub := qemuUser(t, a), qemuUser(t, b); ua == ub {
		// hypervisor.user = "per-vm", the default: no QEMU reaches another's memory or signals as its owner.
		t.Errorf("the two spares' QEMUs %d and %d both run as %d", a, b, ua)
	}
	checkTurns(t, first)
	// A waiting spare's VM takes only CPU nothing else wants: its cgroup at the lowest weight, beside nice 19.
	for _, sp := range first {
		qemu := childQEMU(t, sp.Pid)
		if got, low, ok := cpuWeight(t, cgroupOf(t, qemu)); !ok {
			t.Logf("spare %d's QEMU %d: its cgroup has no CPU weight here (no cpu controller): nice alone orders it", sp.Pid, qemu)
		} else if got != low {
			t.Errorf("spare %d's QEMU %d: CPU weight %s, want the lowest, %s", sp.Pid, qemu, got, low)
		}
		if n := niceOf(t, qemu); n != 19 {
			t.Errorf("spare %d's QEMU %d runs at nice %d, want 19", sp.Pid, qemu, n)
		}
		// And it is the first thing a host short of memory kills.
		for _, pid := range []int{sp.Pid, qemu} {
			if adj := oomScoreAdj(t, pid); adj != 1000 {
				t.Errorf("spare %d's process %d has oom_score_adj %d, want 1000", sp.Pid, pid, adj)
			}
		}
	}

	logStart := k.logSize()
	ids := []string{"kiln-pool-1", "kiln-pool-2"}
	type result struct {
		out, errOut string
		err         error
	}
	results := make([]result, len(ids))
	var wg sync.WaitGroup
	for i, id := range ids {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
			defer cancel()
			cmd := k.d.CtrCommand(ctx, append(append([]string{"run"}, KilnRunArgs(k.cfg)...), "--rm", BusyboxRef, id, "echo", id)...)
			var stdout, stderr strings.Builder
			cmd.Stdout, cmd.Stderr = &stdout, &stderr
			err := cmd.Run()
			results[i] = result{stdout.String(), stderr.String(), err}
		}()
	}
	wg.Wait()
	log := k.logSince(t, logStart)
	for i, id := range ids {
		if r := results[i]; r.err != nil || strings.TrimSpace(r.out) != id {
			t.Errorf("%s: %v, stdout %q, stderr %s", id, r.err, r.out, r.errOut)
		}
		if !strings.Contains(log, "the spare shim's warm VM runs the task\" container="+id) {
			t.Errorf("%s did not run in a spare's VM; containerd's log:\n%s", id, k.d.LogTail(40))
		}
	}
	if strings.Contains(log, "booting one") {
		t.Errorf("a task started beside the other booted a VM; containerd's log:\n%s", k.d.LogTail(40))
	}
	if !WaitSpares(addr, 2, 4*time.Minute) {
		t.Fatalf("the pool of %s was not filled again: %+v", addr, sparesOf(addr))
	}
	for _, sp := range sparesOf(addr) {
		if sp.Pid == first[0].Pid || sp.Pid == first[1].Pid {
			t.Errorf("spare %d still waits after two tasks took the pool's two spares", sp.Pid)
		}
	}

	// The task that takes a spare puts its VM back in the foreground: the VM's own cgroup at the usual weight,
	// its processes at nice 0.
	const taker = "kiln-pool-3"
	k.runDetached(t, taker, nil, sleeper...)
	k.waitStatus(t, taker, "RUNNING")
	if !strings.Contains(k.logSince(t, logStart), "the spare shim's warm VM runs the task\" container="+taker) {
		t.Fatalf("%s did not run in a spare's VM; containerd's log:\n%s", taker, k.d.LogTail(40))
	}
	vm := filepath.Join(k.d.StateDir(), k.vmOf(t, taker))
	dirs, err := os.ReadFile(filepath.Join(vm, "cgroups"))
	if err != nil {
		t.Fatal(err)
	}
	for _, dir := range strings.Fields(string(dirs)) {
		if got, low, ok := cpuWeight(t, dir); ok && got == low {
			t.Errorf("%s's VM cgroup %s: CPU weight %s, still the lowest", taker, dir, got)
		}
	}
	for _, pid := range qemusIn(vm) {
		if n := niceOf(t, pid); n != 0 {
			t.Errorf("%s's QEMU %d runs at nice %d, want 0", taker, pid, n)
		}
		// No spare's standing with the OOM killer either: the shim's (containerd's plus one), as a VM booted
		// for the task has.
		shim := ppidOf(t, pid)
		if adj, shimAdj := oomScoreAdj(t, pid), oomScoreAdj(t, shim); adj != shimAdj || shimAdj == 1000 {
			t.Errorf("%s's QEMU %d has oom_score_adj %d, its shim %d %d; want the shim's, not a spare's 1000", taker, pid, adj, shim, shimAdj)
		}
	}
	k.remove(t, taker)
}

// qemuUser is the uid QEMU pid runs as, which must be its gid too, every one of them (real, effective, saved, for
// the filesystem) one of the default hypervisor.user_range.
func qemuUser(t *testing.T, pid int) uint32 {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	u, _, err := config.Default().Hypervisor.ResolveUser()
	if err != nil {
		t.Fatal(err)
	}
	first, count := u.Range.First, u.Range.Count
	var ids []string
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "Uid:"); ok {
			ids = append(ids, strings.Fields(rest)...)
		} else if rest, ok := strings.CutPrefix(line, "Gid:"); ok {
			ids = append(ids, strings.Fields(rest)...)
		}
	}
	if len(ids) != 8 {
		t.Fatalf("QEMU %d's status has ids %v", pid, ids)
	}
	id, err := strconv.ParseUint(ids[0], 10, 32)
	if err != nil || slices.ContainsFunc(ids, func(s string) bool { return s != ids[0] }) || uint32(id) < first || uint32(id)-first >= count {
		t.Fatalf("QEMU %d runs as uids and gids %v, want one id of %d:%d", pid, ids, first, count)
	}
	return uint32(id)
}

// oomScoreAdj is process pid's oom_score_adj.
func oomScoreAdj(t *testing.T, pid int) int {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/oom_score_adj", pid))
	if err != nil {
		t.Fatal(err)
	}
	adj, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		t.Fatal(err)
	}
	return adj
}

// ppidOf is process pid's parent (/proc/PID/stat's 4th field).
func ppidOf(t *testing.T, pid int) int {
	t.Helper()
	f := statFields(pid)
	if len(f) < 2 {
		t.Fatalf("process %d: stat fields %q", pid, f)
	}
	ppid, err := strconv.Atoi(f[1])
	if err != nil {
		t.Fatalf("parent of %d: %v", pid, err)
	}
	return ppid
}

// cgroupOf is the CPU cgroup directory of process pid: the cpu hierarchy's on cgroup v1, the one on v2.
func cgroupOf(t *testing.T, pid int) string { return controllerCgroupOf(t, pid, "cpu") }

// controllerCgroupOf is the cgroup directory of process pid in the hierarchy of controller ctl on cgroup v1, the
// one on v2.
func controllerCgroupOf(t *testing.T, pid int, ctl string) string {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		parts := strings.SplitN(line, ":", 3)
		if len(parts) != 3 {
			continue
		}
		if parts[0] == "0" && parts[1] == "" {
			return filepath.Join("/sys/fs/cgroup", parts[2])
		}
		if slices.Contains(strings.Split(parts[1], ","), ctl) {
			return filepath.Join("/sys/fs/cgroup", parts[1], parts[2])
		}
	}
	t.Fatalf("process %d has no %s cgroup: %s", pid, ctl, b)
	return ""
}

// cpuWeight reads the CPU weight of cgroup directory dir (v1 cpu.shares, v2 cpu.weight) and the lowest a
// background cgroup has; not ok for a v2 cgroup without the cpu controller or a v1 directory of another hierarchy.
func cpuWeight(t *testing.T, dir string) (got, lowest string, ok bool) {
	t.Helper()
	for _, f := range []struct{ file, lowest string }{{"cpu.shares", "2"}, {"cpu.weight", "1"}} {
		if b, err := os.ReadFile(filepath.Join(dir, f.file)); err == nil {
			return strings.TrimSpace(string(b)), f.lowest, true
		}
	}
	return "", "", false
}

// readySpare gives k's tasks spares (spareConfig), runs a first task, id, whose shim starts one, and waits for it
// to be ready. It returns the containerd's address, which keys its spare.
func (k *kilnEnv) readySpare(t *testing.T, id string) string {
	t.Helper()
	k.spareConfig(t)
	if out, errOut, code := k.run(t, "--rm", BusyboxRef, id, "true"); code != 0 {
		t.Fatalf("first run: exit %d, stdout %q, stderr %s", code, out, errOut)
	}
	if !WaitSpare(k.d.Address, 3*time.Minute) {
		t.Fatalf("no spare shim became ready for %s", k.d.Address)
	}
	return k.d.Address
}

// niceOf is the nice value of process pid (/proc/PID/stat's 19th field).
func niceOf(t *testing.T, pid int) int {
	t.Helper()
	f := statFields(pid)
	if len(f) < 17 {
		t.Fatalf("process %d: stat fields %q", pid, f)
	}
	n, err := strconv.Atoi(f[16])
	if err != nil {
		t.Fatalf("nice of %d: %v", pid, err)
	}
	return n
}

// A shim that took a spare's VM and is then killed is cleaned up after as any other: containerd's `delete` finds
// the spare's VM through the task record, stops it and removes its state, share and cgroup.
func TestKilnSpareShimKilled(t *testing.T) {
	k := startKiln(t)
	k.readySpare(t, "kiln-sparekill-1")
	const id = "kiln-sparekill-2"
	k.runDetached(t, id, nil, sleeper...)
	k.waitStatus(t, id, "RUNNING")
	if !strings.Contains(k.logSince(t, 0), "the spare shim's warm VM runs the task\" container="+id) {
		t.Fatalf("%s did not run in the spare's VM; containerd's log:\n%s", id, k.d.LogTail(40))
	}
	k.killShim(t, id)
	_, _, _ = k.ctrCode(t, nil, "tasks", "delete", id)
	// checkNoLeftovers (at cleanup) asserts that the spare's VM, its virtiofsd, share and state are gone.
}

// A task with OCI hooks (nerdctl's and Docker's network hooks) takes a spare too: its createRuntime hook wires the
// namespace the spare's VM then gets. When the spare's VM dies once the hooks ran (here the hook kills it), the
// task boots a VM of its own with what the hooks prepared: they run once, and the container is served.
func TestKilnSpareShimHooks(t *testing.T) {
	k := startKiln(t)
	addr := k.readySpare(t, "kiln-sparehook-0")
	const a, b = "kiln-sparehook-a", "kiln-sparehook-b"
	ha := k.startHooked(t, a, "kbr-sph-a", "10.231.5.0/24", "")
	if !strings.Contains(k.logSince(t, 0), "the spare shim's warm VM runs the task\" container="+a) {
		t.Errorf("%s did not run in the spare's VM; containerd's log:\n%s", a, k.d.LogTail(40))
	}
	if got := strings.TrimSpace(httpGet(t, "http://"+ha.ip+":8080/")); got != a {
		t.Errorf("%s answered %q", a, got)
	}
	if n := ha.runs(t, "ADD"); n != 1 {
		t.Errorf("%s's createRuntime hook ran %d times, want 1", a, n)
	}

	// The hooked task's shim started the next spare. This hook kills its VM (QEMU, a child of the shim that runs
	// the hook) once the namespace is wired.
	if !WaitSpare(addr, 3*time.Minute) {
		t.Fatalf("the hooked task's shim started no spare for %s", addr)
	}
	logStart := k.logSize()
	killVM := `for s in /proc/[0-9]*/stat; do
	set -- $(cat $s 2>/dev/null)
	[ "$4" = "$PPID" ] && [ "$2" = "(qemu-system-x86)" ] && kill -9 $1
done
exit 0`
	hb := k.startHooked(t, b, "kbr-sph-b", "10.231.6.0/24", killVM)
	log := k.logSince(t, logStart)
	if !strings.Contains(log, "the spare shim's VM could not take the task; booting one") || !strings.Contains(log, "hooks_ran=true") {
		t.Errorf("%s's spare did not fail after its hooks ran; containerd's log:\n%s", b, k.d.LogTail(40))
	}
	if got := strings.TrimSpace(httpGet(t, "http://"+hb.ip+":8080/")); got != b {
		t.Errorf("%s answered %q", b, got)
	}
	if n := hb.runs(t, "ADD"); n != 1 {
		t.Errorf("%s's createRuntime hook ran %d times, want 1", b, n)
	}
	k.remove(t, b)
	if n := hb.runs(t, "DEL"); n != 1 {
		t.Errorf("%s's poststop hook ran %d times, want 1", b, n)
	}
	// The host cgroup the spare's pod entered for b went to the VM booted instead, which removed it at its end.
	if _, err := os.Stat(filepath.Join(namespaceCgroup(), b)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("%s's host cgroup is left (%v)", b, err)
	}
}

// A spare's VM that dies or hangs while it waits, or the spare shim killed, costs no task its container. A hung
// guest (its QEMU stopped) fails the spare's health check at adoption: the task boots a VM of its own. A killed
// QEMU makes the spare leave its slot at once, keeping its log: the next task finds no spare and boots from its
// template. A killed spare shim takes its VM with it, and what it leaves on disk is swept by the next boot.
func TestKilnSpareVMLost(t *testing.T) {
	k := startKiln(t)
	addr := k.readySpare(t, "kiln-sparelost-0")
	hung := spareQEMU(t, addr)
	if err := syscall.Kill(hung, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	logStart := k.logSize()
	start := time.Now()
	out, errOut, code := k.run(t, "--rm", BusyboxRef, "kiln-sparelost-1", "echo", "served")
	if code != 0 || strings.TrimSpace(out) != "served" {
		t.Fatalf("run after the spare's guest hung: exit %d, stdout %q, stderr %s", code, out, errOut)
	}
	t.Logf("ctr run with a hung spare took %s", time.Since(start))
	if log := k.logSince(t, logStart); !strings.Contains(log, "could not take the task") || !strings.Contains(log, "health check") {
		t.Errorf("the hung spare's health check did not refuse the task; containerd's log:\n%s", k.d.LogTail(40))
	}
	if err := syscall.Kill(hung, 0); err == nil {
		t.Errorf("the hung spare's QEMU %d still runs", hung)
	}

	if !WaitSpare(addr, 3*time.Minute) {
		t.Fatalf("no spare shim became ready for %s after the hung one", addr)
	}
	sp, _ := spareOf(addr)
	if err := syscall.Kill(spareQEMU(t, addr), syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(50 * time.Millisecond) {
		if _, ok := spareOf(addr); !ok {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the spare whose QEMU was killed still holds its slot")
		}
	}
	if b, err := os.ReadFile(sp.Slot + ".log"); err != nil || !strings.Contains(string(b), "the spare shim's VM ended") {
		t.Errorf("the lost spare's log = %q (%v), want it kept, saying why it left", b, err)
	}
	_ = os.Remove(sp.Slot + ".log")
	out, errOut, code = k.run(t, "--rm", BusyboxRef, "kiln-sparelost-2", "echo", "served")
	if code != 0 || strings.TrimSpace(out) != "served" {
		t.Fatalf("run after the spare's QEMU was killed: exit %d, stdout %q, stderr %s", code, out, errOut)
	}

	// The spare shim itself killed: its QEMU and virtiofsd die with it (their parent-death signal), `start` finds
	// the slot's socket dead and starts the server itself, and that task's boot sweeps the state and share the
	// spare left (startKiln's leftover check looks for them at the end).
	if !WaitSpare(addr, 3*time.Minute) {
		t.Fatalf("no spare shim became ready for %s after the lost one", addr)
	}
	sp, _ = spareOf(addr)
	qemu := spareQEMU(t, addr)
	if err := syscall.Kill(sp.Pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(time.Minute); syscall.Kill(qemu, 0) == nil; time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the killed spare's QEMU %d outlived it", qemu)
		}
	}
	out, errOut, code = k.run(t, "--rm", BusyboxRef, "kiln-sparelost-3", "echo", "served")
	if code != 0 || strings.TrimSpace(out) != "served" {
		t.Fatalf("run after the spare shim was killed: exit %d, stdout %q, stderr %s", code, out, errOut)
	}
	_ = os.Remove(sp.Slot + ".log")
}

// spareQEMU is the QEMU of the ready spare shim of the containerd at address: the spare's child.
func spareQEMU(t *testing.T, address string) int {
	t.Helper()
	sp, ok := spareOf(address)
	if !ok {
		t.Fatalf("no spare shim for %s", address)
	}
	return childQEMU(t, sp.Pid)
}

// childQEMU is the QEMU that process shim started.
func childQEMU(t *testing.T, shim int) int {
	t.Helper()
	for _, pid := range ProcessesMatching("qemu-system") {
		if f := statFields(pid); len(f) > 1 && f[1] == strconv.Itoa(shim) {
			return pid
		}
	}
	t.Fatalf("shim %d has no QEMU", shim)
	return 0
}

// A task's `start` that finds no spare ready holds the spares still booting: their programs (QEMU, virtiofsd)
// stand still until the task has started, until whoever holds them is gone (runtime/spare's
// TestHoldEndsWithItsHolder), or until the spare has stood still for spare.MaxHold in all; the spare then boots on
// and serves the next task. The test holds the booting spare itself first, as `start` does, so that a task here
// surely starts beside a booting spare. startKiln's leftover check fails the test if a spare stays stopped.
func TestKilnSpareHeld(t *testing.T) {
	k := startKiln(t)
	k.spareConfig(t)
	addr := k.d.Address
	k.runDetached(t, "kiln-held-1", nil, sleeper...)
	k.waitStatus(t, "kiln-held-1", "RUNNING")
	holds := holdBootingSpare(t, addr)
	sp, _ := spareOf(addr)
	waitSpareStopped(t, sp.Pid)

	log := k.logSince(t, 0)
	out, errOut, code := k.run(t, "--rm", BusyboxRef, "kiln-held-2", "echo", "beside")
	if code != 0 || strings.TrimSpace(out) != "beside" {
		t.Fatalf("run beside the held spare: exit %d, stdout %q, stderr %s", code, out, errOut)
	}
	if got := k.logSince(t, int64(len(log))); !strings.Contains(got, `the booting spares it held go on" container=kiln-held-2`) {
		t.Errorf("kiln-held-2's shim let go of no spare it held; containerd's log:\n%s", k.d.LogTail(40))
	}
	// An exec's start holds the booting spare too (as an exec probe's does), and lets go once it has started.
	log = k.logSince(t, 0)
	if out, errOut, code := k.ctrCode(t, nil, "tasks", "exec", "--exec-id", "probe", "kiln-held-1", "true"); code != 0 {
		t.Fatalf("exec beside the held spare: exit %d, stdout %q, stderr %s", code, out, errOut)
	}
	if got := k.logSince(t, int64(len(log))); !strings.Contains(got, `the booting spares the exec's start held go on" container=kiln-held-1 exec=probe`) {
		t.Errorf("the exec's start let go of no spare it held; containerd's log:\n%s", k.d.LogTail(40))
	}
	// Still held by the test, unless that run took the spare's whole limit (a loaded host): then its log says so.
	now, ok := spareOf(addr)
	stillHeld := ok && now.Pid == sp.Pid && !now.Ready && len(stopped(hostcgroup.Descendants(sp.Pid))) > 0
	if b, _ := os.ReadFile(sp.Slot + ".log"); !stillHeld && !strings.Contains(string(b), "the spare stood still as long as it may") {
		t.Fatalf("the spare held by the test: %+v (held by %d), stopped programs %v; its log:\n%s", now, sp.Pid, stopped(hostcgroup.Descendants(sp.Pid)), b)
	}
	CloseHolds(holds)
	if !WaitSpare(addr, 3*time.Minute) {
		t.Fatalf("the spare did not become ready once let go")
	}
	if held := HeldSpares(addr); len(held) > 0 {
		t.Fatalf("the ready spare: %v", held)
	}
	if b, err := os.ReadFile(sp.Slot + ".log"); err != nil || !strings.Contains(string(b), "the tasks' starts let the spare go on") &&
		!strings.Contains(string(b), "the spare stood still as long as it may") {
		t.Errorf("the spare's log (%v) says neither that it was let go nor that its time ran out:\n%s", err, b)
	}
	out, errOut, code = k.run(t, "--rm", BusyboxRef, "kiln-held-3", "echo", "served")
	if code != 0 || strings.TrimSpace(out) != "served" {
		t.Fatalf("run in the spare: exit %d, stdout %q, stderr %s", code, out, errOut)
	}
	if !strings.Contains(k.logSince(t, 0), `the spare shim's warm VM runs the task" container=kiln-held-3`) {
		t.Errorf("kiln-held-3 did not run in the spare's VM; containerd's log:\n%s", k.d.LogTail(40))
	}

	// kiln-held-3's shim started the next spare. Held and never let go, it goes on after its limit.
	holds = holdBootingSpare(t, addr)
	next, _ := spareOf(addr)
	if !WaitSpare(addr, 3*time.Minute) {
		t.Fatalf("the spare held past its limit did not become ready")
	}
	if b, err := os.ReadFile(next.Slot + ".log"); err != nil || !strings.Contains(string(b), "the spare stood still as long as it may") {
		t.Errorf("the spare's log (%v) does not say its hold ran out:\n%s", err, b)
	}
	CloseHolds(holds)

	// A held spare shim killed: its stopped QEMU and virtiofsd die with it (their parent-death signal is SIGKILL,
	// which a stopped process does not wait for), and the next task's boot sweeps what it left on disk (startKiln's
	// leftover check looks at the end).
	out, errOut, code = k.run(t, "--rm", BusyboxRef, "kiln-held-4", "true")
	if code != 0 {
		t.Fatalf("kiln-held-4: exit %d, stdout %q, stderr %s", code, out, errOut)
	}
	holds = holdBootingSpare(t, addr)
	defer CloseHolds(holds)
	killed, _ := spareOf(addr)
	waitSpareStopped(t, killed.Pid)
	programs := hostcgroup.Descendants(killed.Pid)
	if err := syscall.Kill(killed.Pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	for _, pid := range programs {
		for deadline := time.Now().Add(time.Minute); syscall.Kill(pid, 0) == nil; time.Sleep(50 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("process %d of the killed held spare outlived it (stopped: %v)", pid, stopped([]int{pid}))
			}
		}
	}
	out, errOut, code = k.run(t, "--rm", BusyboxRef, "kiln-held-5", "echo", "served")
	if code != 0 || strings.TrimSpace(out) != "served" {
		t.Fatalf("run after the held spare was killed: exit %d, stdout %q, stderr %s", code, out, errOut)
	}
	_ = os.Remove(killed.Slot + ".log")

	// A held spare told to stop (SIGTERM, as `make uninstall` does) stops its VM, whose held programs are continued
	// to be asked to quit, and leaves with its slot's files, the hold socket among them.
	holds = holdBootingSpare(t, addr)
	defer CloseHolds(holds)
	told, _ := spareOf(addr)
	waitSpareStopped(t, told.Pid)
	programs = hostcgroup.Descendants(told.Pid)
	if err := StopSpare(addr, time.Minute); err != nil {
		t.Fatalf("stop a held spare: %v", err)
	}
	for _, pid := range programs {
		if syscall.Kill(pid, 0) == nil {
			t.Errorf("process %d of the held spare told to stop outlived it (stopped: %v)", pid, stopped([]int{pid}))
		}
	}
}

// holdBootingSpare holds the spare of the containerd at address as soon as it boots (HoldBootingSpare).
func holdBootingSpare(t *testing.T, address string) []*os.File {
	t.Helper()
	holds, err := HoldBootingSpare(address, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	return holds
}

// waitSpareStopped waits for the QEMU and the virtiofsd of the spare shim spare to be stopped.
func waitSpareStopped(t *testing.T, spare int) {
	t.Helper()
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(50 * time.Millisecond) {
		var qemu, virtiofsd bool
		for _, pid := range stopped(hostcgroup.Descendants(spare)) {
			b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
			qemu = qemu || bytes.Contains(b, []byte("qemu-system"))
			virtiofsd = virtiofsd || bytes.Contains(b, []byte("virtiofsd"))
		}
		if qemu && virtiofsd {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the held spare %d's QEMU stopped %v, virtiofsd stopped %v", spare, qemu, virtiofsd)
		}
	}
}

// checkTurns checks that the spares, spawned together, booted in turns (spare.WaitTurn): each logged its turn, and
// where the host boots one spare at a time, one of them waited for the other's boot.
func checkTurns(t *testing.T, spares []spare.Info) {
	t.Helper()
	var longest time.Duration
	for _, sp := range spares {
		b, err := os.ReadFile(sp.Slot + ".log")
		if err != nil {
			t.Fatal(err)
		}
		var line string
		for l := range strings.Lines(string(b)) {
			if strings.Contains(l, "the spare's turn to boot") {
				line = strings.TrimSpace(l)
			}
		}
		_, waited, ok := strings.Cut(line, "waited=")
		if !ok {
			t.Fatalf("spare %d did not log its turn to boot; its log:\n%s", sp.Pid, b)
		}
		waited, _, _ = strings.Cut(waited, " ")
		d, err := time.ParseDuration(waited)
		if err != nil {
			t.Fatalf("spare %d's turn: %q: %v", sp.Pid, line, err)
		}
		longest = max(longest, d)
	}
	// Both spares' gates opened together (one spawner): with one turn, the second waited at least one poll.
	cpus := runtime.NumCPU()
	if turns := cpus / spare.TurnCPUs(cpus, config.Default().Hypervisor.VCPUs); turns == 1 && longest < 50*time.Millisecond {
		t.Errorf("one spare boots at a time here, but neither of the pool's two waited for its turn (longest %s)", longest)
	}
}

// A task whose spec Kiln refuses starts no spare for the tasks to come: its shim refuses the spec before that,
// so a client that retries it (kubelet does) does not boot a VM a try. The spare it may have been handed at
// `start` goes with it.
func TestKilnRefusedSpecStartsNoSpare(t *testing.T) {
	k := startKiln(t)
	addr := k.readySpare(t, "kiln-refused-1")
	ready, _ := spareOf(addr)
	const id = "kiln-refused-2"
	args := append(append([]string{"run", "--rm"}, KilnRunArgs(k.cfg)...), "--apparmor-profile", "kiln-test-profile", BusyboxRef, id, "true")
	_, errOut, code := k.ctrCode(t, nil, args...)
	if code == 0 || !strings.Contains(errOut, "runtime.host_lsm") {
		t.Fatalf("ctr run with an AppArmor profile: exit %d, stderr %s; want it refused naming runtime.host_lsm", code, errOut)
	}
	for _, sp := range sparesOf(addr) {
		if sp.Pid != ready.Pid {
			t.Errorf("the refused task's shim started a spare: %+v (the one ready before: %d)", sp, ready.Pid)
		}
	}
	k.remove(t, id)
}

// A spare whose guest came from files replaced since it booted (QEMU upgraded, `make image` run again, with the
// shim binary unchanged) is stale: the next task does not run the old guest in it. The spare leaves, the task
// boots from the new files, and its shim starts a spare of them.
func TestKilnSpareOfReplacedGuestLeaves(t *testing.T) {
	k := startKiln(t)
	// The guest's files are copies of the test's own, which the test can replace.
	assets := t.TempDir()
	for _, d := range []string{filepath.Dir(assets), assets} {
		if err := os.Chmod(d, 0o755); err != nil { // QEMU runs as a user of its own, which reads them
			t.Fatal(err)
		}
	}
	for _, f := range []string{"vmlinuz", "initrd.img", "agent.img", "agent-version", "kernel-release"} {
		b, err := os.ReadFile(filepath.Join(k.assets, f))
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(assets, f), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	cfg, err := k.d.KilnConfig(assets, "[hypervisor]\nfast_start = \"template\"\nspare = true\n")
	if err != nil {
		t.Fatal(err)
	}
	k.cfg = cfg
	addr := k.d.Address
	if out, errOut, code := k.run(t, "--rm", BusyboxRef, "kiln-stale-1", "echo", "first"); code != 0 || strings.TrimSpace(out) != "first" {
		t.Fatalf("first run: exit %d, stdout %q, stderr %s", code, out, errOut)
	}
	if !WaitSpare(addr, 3*time.Minute) {
		t.Fatalf("no spare shim became ready for %s", addr)
	}
	stale, _ := spareOf(addr)
	// As `make image` does it: a new file renamed into place.
	initrd := filepath.Join(assets, "initrd.img")
	b, err := os.ReadFile(initrd)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(initrd+".new", b, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(initrd+".new", initrd); err != nil {
		t.Fatal(err)
	}
	if out, errOut, code := k.run(t, "--rm", BusyboxRef, "kiln-stale-2", "echo", "second"); code != 0 || strings.TrimSpace(out) != "second" {
		t.Fatalf("run after the initrd was replaced: exit %d, stdout %q, stderr %s", code, out, errOut)
	}
	if log := k.logSince(t, 0); strings.Contains(log, "the spare shim's warm VM runs the task\" container=kiln-stale-2") {
		t.Errorf("kiln-stale-2 ran in the spare booted from the replaced initrd")
	}
	if !WaitSpare(addr, 3*time.Minute) {
		t.Fatalf("kiln-stale-2's shim started no spare for %s", addr)
	}
	if sp, _ := spareOf(addr); sp.Pid == stale.Pid {
		t.Fatalf("the stale spare %d still waits", sp.Pid)
	}
	if out, errOut, code := k.run(t, "--rm", BusyboxRef, "kiln-stale-3", "echo", "third"); code != 0 || strings.TrimSpace(out) != "third" {
		t.Fatalf("third run: exit %d, stdout %q, stderr %s", code, out, errOut)
	}
	if log := k.logSince(t, 0); !strings.Contains(log, "the spare shim's warm VM runs the task\" container=kiln-stale-3") {
		t.Errorf("kiln-stale-3 did not run in the spare of the new files; containerd's log:\n%s", k.d.LogTail(40))
	}
}
