package qemu

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/kiln-runtime/kiln/vm/child"
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

// A VM whose owner was killed leaves its cgroup as well as its state directory; the sweep removes both, and
// only a cgroup named after that VM, whatever its state directory's record says.
func TestSweepRemovesTheDeadVMsCgroup(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to create cgroups")
	}
	root := t.TempDir()
	cmd := exec.Command("true")
	if err := cmd.Run(); err != nil {
		t.Fatal(err)
	}
	newCgroup := func(name string) *child.Cgroup {
		t.Helper()
		cg, err := child.NewCgroup(name, 64<<20)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = cg.Remove() })
		return cg
	}
	suffix := strconv.Itoa(os.Getpid())
	own := newCgroup("kiln-vm-dead-" + suffix)
	foreign := newCgroup("kiln-sweep-test-" + suffix)
	for name, cgroups := range map[string][]string{
		"dead-" + suffix:     own.Dirs(),
		"tampered-" + suffix: foreign.Dirs(),
	} {
		dir := filepath.Join(root, name)
		if err := os.Mkdir(dir, 0o700); err != nil {
			t.Fatal(err)
		}
		for file, content := range map[string]string{
			"owner": strconv.Itoa(cmd.Process.Pid), cgroupsFile: strings.Join(cgroups, "\n") + "\n",
		} {
			if err := os.WriteFile(filepath.Join(dir, file), []byte(content), 0o600); err != nil {
				t.Fatal(err)
			}
		}
	}
	removed, err := Sweep(root)
	if err == nil || !strings.Contains(err.Error(), "not one of its own") {
		t.Errorf("sweep error %v, want one about the tampered record", err)
	}
	if len(removed) != 1 {
		t.Errorf("removed %v, want the dead VM's directory only (the tampered one errs)", removed)
	}
	for _, d := range own.Dirs() {
		if _, err := os.Stat(d); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("the dead VM's cgroup %s is still there: %v", d, err)
		}
	}
	for _, d := range foreign.Dirs() {
		if _, err := os.Stat(d); err != nil {
			t.Errorf("a cgroup the record named but the VM does not own was touched: %v", err)
		}
	}
}
