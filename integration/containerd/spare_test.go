package containerd

import (
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kiln-runtime/kiln/runtime/spare"
)

// With hypervisor.spare, a task's shim starts a spare shim for the next task of its containerd, and the next
// task's shim is that spare: its VM was booted and warmed before the task came. The container runs there as in
// any VM; a spare told to stop (SIGTERM) stops its VM and leaves nothing behind.
func TestKilnSpareShim(t *testing.T) {
	k := startKiln(t)
	cfg, err := k.d.KilnConfig(k.assets, "[hypervisor]\nspare = true\n")
	if err != nil {
		t.Fatal(err)
	}
	k.cfg = cfg
	addr := k.d.Address
	// Registered after startKiln's leftover check, so it runs before it.
	t.Cleanup(func() { stopSpare(t, addr) })

	out, errOut, code := k.run(t, "--rm", BusyboxRef, "kiln-spare-1", "echo", "first")
	if code != 0 || strings.TrimSpace(out) != "first" {
		t.Fatalf("first run: exit %d, stdout %q, stderr %s", code, out, errOut)
	}
	waitSpare(t, addr)
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
	waitSpare(t, addr)
}

// spareOf is the spare shim of the containerd at addr, if one holds its slot.
func spareOf(addr string) (spare.Info, bool) {
	for _, sp := range spare.All() {
		if sp.Address == addr {
			return sp, true
		}
	}
	return spare.Info{}, false
}

// waitSpare waits until a spare shim is ready for the containerd at addr.
func waitSpare(t *testing.T, addr string) {
	t.Helper()
	deadline := time.Now().Add(3 * time.Minute)
	for {
		if sp, ok := spareOf(addr); ok && sp.Ready {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("no spare shim became ready for %s", addr)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// stopSpare stops the spare shim of the containerd at addr, if one runs, and checks it went with its slot.
func stopSpare(t *testing.T, addr string) {
	t.Helper()
	sp, ok := spareOf(addr)
	if !ok {
		return
	}
	_ = syscall.Kill(sp.Pid, syscall.SIGTERM)
	deadline := time.Now().Add(time.Minute)
	for syscall.Kill(sp.Pid, 0) == nil {
		if time.Now().After(deadline) {
			_ = syscall.Kill(sp.Pid, syscall.SIGKILL)
			t.Errorf("spare shim %d did not stop on SIGTERM", sp.Pid)
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	if _, ok := spareOf(addr); ok {
		t.Errorf("spare shim %d left its slot behind", sp.Pid)
	}
}
