package containerd

import (
	"strings"
	"testing"
	"time"
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
// container runs there as in any VM. A task of another shape finds the spare, stops its VM and boots its own. A
// spare told to stop (SIGTERM) stops its VM and leaves nothing behind.
func TestKilnSpareShim(t *testing.T) {
	k := startKiln(t)
	k.spareConfig(t)
	addr := k.d.Address
	// A memory limit grows each task's VM by 64 MiB: the spares are of that shape.
	limit := []string{"--memory-limit", "67108864"}

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
	// The second task's shim started the next spare, of the same shape; a task without the limit does not fit it.
	if !WaitSpare(addr, 3*time.Minute) {
		t.Fatalf("the second task's shim started no spare for %s", addr)
	}
	logStart := k.logSize()
	out, errOut, code = k.run(t, "--rm", BusyboxRef, "kiln-spare-3", "echo", "third")
	if code != 0 || strings.TrimSpace(out) != "third" {
		t.Fatalf("run of another shape: exit %d, stdout %q, stderr %s", code, out, errOut)
	}
	if log := k.logSince(t, logStart); !strings.Contains(log, "asks for another VM size") {
		t.Errorf("kiln-spare-3 (no memory limit) was not refused by the spare of the limited tasks' shape; containerd's log:\n%s", k.d.LogTail(40))
	}
}

// A shim that took a spare's VM and is then killed is cleaned up after as any other: containerd's `delete` finds
// the spare's VM through the task record, stops it and removes its state, share and cgroup.
func TestKilnSpareShimKilled(t *testing.T) {
	k := startKiln(t)
	k.spareConfig(t)
	addr := k.d.Address
	out, errOut, code := k.run(t, "--rm", BusyboxRef, "kiln-sparekill-1", "true")
	if code != 0 {
		t.Fatalf("first run: exit %d, stdout %q, stderr %s", code, out, errOut)
	}
	if !WaitSpare(addr, 3*time.Minute) {
		t.Fatalf("no spare shim became ready for %s", addr)
	}
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
