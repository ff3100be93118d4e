package qemu

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"

	"golang.org/x/sys/unix"
)

// A share left by a killed Kiln process still has its bind mounts of host directories: the sweep must take
// them away, never delete the host's files through them, and still remove the directory.
func TestSweepLeavesMountedHostFilesAlone(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to mount")
	}
	root := t.TempDir()
	dead := exec.Command("true")
	if err := dead.Run(); err != nil {
		t.Fatal(err)
	}
	state := filepath.Join(root, "run-x.share")
	target := filepath.Join(state, "mounts", "c1", "binds", "1-data")
	if err := os.MkdirAll(target, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(state, "owner"), []byte(strconv.Itoa(dead.Process.Pid)), 0o600); err != nil {
		t.Fatal(err)
	}
	host := t.TempDir()
	precious := filepath.Join(host, "precious")
	if err := os.WriteFile(precious, []byte("host data"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount(host, target, "", unix.MS_BIND, ""); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = unix.Unmount(target, unix.MNT_DETACH) })
	// A read-only bind below it, as a share's "ro" volumes are.
	ro := filepath.Join(state, "mounts", "c1", "binds", "2-ro")
	if err := os.MkdirAll(ro, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount(host, ro, "", unix.MS_BIND, ""); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("", ro, "", unix.MS_BIND|unix.MS_REMOUNT|unix.MS_RDONLY, ""); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = unix.Unmount(ro, unix.MNT_DETACH) })

	removed, err := Sweep(root)
	if b, rerr := os.ReadFile(precious); rerr != nil || string(b) != "host data" {
		t.Fatalf("the sweep deleted or changed a host file mounted into the share: %q, %v", b, rerr)
	}
	if err != nil {
		t.Fatalf("sweep: %v", err)
	}
	if len(removed) != 1 || removed[0] != state {
		t.Errorf("removed %v, want [%s]", removed, state)
	}
	if _, err := os.Stat(state); !os.IsNotExist(err) {
		t.Errorf("the dead owner's share is still there: %v", err)
	}
}
