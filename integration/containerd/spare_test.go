package containerd

import (
	"os"
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

// With hypervisor.spare, a task's shim starts a spare shim for the next task of its containerd, and the next
// task's shim is that spare: its VM was booted and warmed before the task came. The container runs there as in
// any VM; a spare told to stop (SIGTERM) stops its VM and leaves nothing behind.
func TestKilnSpareShim(t *testing.T) {
	k := startKiln(t)
	k.spareConfig(t)
	addr := k.d.Address

	out, errOut, code := k.run(t, "--rm", BusyboxRef, "kiln-spare-1", "echo", "first")
	if code != 0 || strings.TrimSpace(out) != "first" {
		t.Fatalf("first run: exit %d, stdout %q, stderr %s", code, out, errOut)
	}
	if !WaitSpare(addr, 3*time.Minute) {
		t.Fatalf("no spare shim became ready for %s", addr)
	}
	out, errOut, code = k.run(t, "--rm", BusyboxRef, "kiln-spare-2", "sh", "-c", "echo second; exit 3")
	if code != 3 || strings.TrimSpace(out) != "second" {
		t.Fatalf("run in the spare's VM: exit %d (want 3), stdout %q, stderr %s", code, out, errOut)
	}
	log, err := os.ReadFile(k.d.LogPath)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(log), "the spare shim's warm VM runs the task\" container=kiln-spare-2") {
		t.Errorf("kiln-spare-2 did not run in the spare's VM; containerd's log:\n%s", k.d.LogTail(40))
	}
	// The second task's shim started the next spare.
	if !WaitSpare(addr, 3*time.Minute) {
		t.Fatalf("the second task's shim started no spare for %s", addr)
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
	log, err := os.ReadFile(k.d.LogPath)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(log), "the spare shim's warm VM runs the task\" container="+id) {
		t.Fatalf("%s did not run in the spare's VM; containerd's log:\n%s", id, k.d.LogTail(40))
	}
	k.killShim(t, id)
	_, _, _ = k.ctrCode(t, nil, "tasks", "delete", id)
	// checkNoLeftovers (at cleanup) asserts that the spare's VM, its virtiofsd, share and state are gone.
}
