package pod

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"
)

// A sweep leaves a share whose lock another cleaner holds; a shim's delete waits for it; a share that is gone is
// no error.
func TestRemoveShareTakesTheShareLock(t *testing.T) {
	state := t.TempDir()
	dir := ShareDir(state, "kiln-0123456789abcdef")
	if err := os.MkdirAll(filepath.Join(dir, "mounts"), 0o700); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX); err != nil {
		t.Fatal(err)
	}
	if err := RemoveShare(dir, false); err != nil {
		t.Fatalf("RemoveShare without waiting, while another holds the lock: %v", err)
	}
	if _, err := os.Stat(dir); err != nil {
		t.Fatalf("the share another cleaner holds was removed: %v", err)
	}
	done := make(chan error, 1)
	go func() { done <- RemoveShare(dir, true) }()
	time.Sleep(100 * time.Millisecond)
	select {
	case err := <-done:
		t.Fatalf("RemoveShare waiting returned while the lock was held: %v", err)
	default:
	}
	_ = f.Close()
	if err := <-done; err != nil {
		t.Fatalf("RemoveShare once the lock was released: %v", err)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("share still there after RemoveShare: %v", err)
	}
	if err := RemoveShare(dir, true); err != nil {
		t.Errorf("RemoveShare of a share that is gone: %v", err)
	}
}

// A new pod's sweep leaves the share of a dead owner that a shim's delete is removing (holding its lock): neither
// qemu.Sweep, which takes directories with an owner file for VM state, nor the share sweep touches it.
func TestSweepLeavesAShareBeingRemoved(t *testing.T) {
	state := t.TempDir()
	dir := ShareDir(state, "kiln-0123456789abcdef")
	if err := os.MkdirAll(filepath.Join(dir, "mounts"), 0o700); err != nil {
		t.Fatal(err)
	}
	dead := exec.Command("true")
	if err := dead.Run(); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, ownerFile), []byte(strconv.Itoa(dead.Process.Pid)), 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX); err != nil {
		t.Fatal(err)
	}
	sweep(state, logrus.NewEntry(logrus.New()))
	if _, err := os.Stat(filepath.Join(dir, ownerFile)); err != nil {
		t.Fatalf("sweep removed a share another cleaner holds: %v", err)
	}
	_ = f.Close()
	sweep(state, logrus.NewEntry(logrus.New()))
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("sweep left the share of a dead owner nobody holds: %v", err)
	}
}

// A warm-up bundle whose pod's share is gone (its spare was killed while it warmed) is swept; a live pod's is not.
func TestSweepRemovesAGonePodsWarmUp(t *testing.T) {
	state := t.TempDir()
	live, gone := "kiln-0123456789abcdef", "kiln-fedcba9876543210"
	if err := os.MkdirAll(filepath.Join(ShareDir(state, live), "mounts"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(ShareDir(state, live), ownerFile), []byte(strconv.Itoa(os.Getpid())), 0o600); err != nil {
		t.Fatal(err)
	}
	var dirs []string
	for _, id := range []string{live, gone} {
		dir, err := os.MkdirTemp(state, id+warmSuffix)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.Mkdir(filepath.Join(dir, "rootfs"), 0o755); err != nil {
			t.Fatal(err)
		}
		dirs = append(dirs, dir)
	}
	sweep(state, logrus.NewEntry(logrus.New()))
	if _, err := os.Stat(dirs[0]); err != nil {
		t.Errorf("sweep removed a live pod's warm-up: %v", err)
	}
	if _, err := os.Stat(dirs[1]); !os.IsNotExist(err) {
		t.Errorf("a gone pod's warm-up is still there: %v", err)
	}
}
