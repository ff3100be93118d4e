package qemu

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"
)

func TestOwnerAlive(t *testing.T) {
	if !OwnerAlive(os.Getpid()) {
		t.Fatal("this process is not alive")
	}
	// An exited child that nobody has reaped yet is a zombie: it counts as gone.
	cmd := exec.Command("true")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pid := cmd.Process.Pid
	deadline := time.Now().Add(5 * time.Second)
	for OwnerAlive(pid) && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if OwnerAlive(pid) {
		t.Fatalf("exited child %d still counts as alive", pid)
	}
	_ = cmd.Wait()
	if OwnerAlive(pid) {
		t.Fatalf("reaped child %d still counts as alive", pid)
	}
}

func TestSweepRemovesOnlyDeadOwners(t *testing.T) {
	root := t.TempDir()
	cmd := exec.Command("true")
	if err := cmd.Run(); err != nil {
		t.Fatal(err)
	}
	dirs := map[string]string{
		"live":     strconv.Itoa(os.Getpid()),
		"dead":     strconv.Itoa(cmd.Process.Pid),
		"garbage":  "not a pid",
		"no-owner": "",
	}
	for name, owner := range dirs {
		dir := filepath.Join(root, name)
		if err := os.Mkdir(dir, 0o700); err != nil {
			t.Fatal(err)
		}
		if owner != "" {
			if err := os.WriteFile(filepath.Join(dir, "owner"), []byte(owner), 0o600); err != nil {
				t.Fatal(err)
			}
		}
	}
	removed, err := Sweep(root)
	if err != nil {
		t.Fatal(err)
	}
	if len(removed) != 1 || removed[0] != filepath.Join(root, "dead") {
		t.Fatalf("removed %v, want only the dead owner's directory", removed)
	}
	for _, name := range []string{"live", "garbage", "no-owner"} {
		if _, err := os.Stat(filepath.Join(root, name)); err != nil {
			t.Errorf("%s: %v", name, err)
		}
	}
}
