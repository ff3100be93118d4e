package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
)

// runsFrom tells a spare run from the binary `make uninstall` removes, also once a reinstall replaced the file,
// from one run from another binary.
func TestRunsFrom(t *testing.T) {
	dir := t.TempDir()
	sleep, err := exec.LookPath("sleep")
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(sleep)
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "containerd-shim-kiln-v2")
	if err := os.WriteFile(bin, b, 0o755); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "30")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	waited := false
	t.Cleanup(func() {
		if !waited {
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
		}
	})
	pid := cmd.Process.Pid
	if !runsFrom(pid, bin) || runsFrom(pid, sleep) {
		t.Errorf("runsFrom(%d) = %v for %s, %v for %s; want true, false", pid, runsFrom(pid, bin), bin, runsFrom(pid, sleep), sleep)
	}
	if err := os.Remove(bin); err != nil {
		t.Fatal(err)
	}
	if !runsFrom(pid, bin) {
		t.Errorf("runsFrom(%d, %s) = false once the binary was removed, want true", pid, bin)
	}
	// Dead, not yet reaped: its executable is gone as it is from a process on its way out, which may still hold
	// its slot's lock.
	if err := cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if _, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid)); err != nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the killed process kept its executable")
		}
	}
	if !runsFrom(pid, sleep) {
		t.Errorf("runsFrom(%d) = false for a process that lost its executable, want true", pid)
	}
	_ = cmd.Wait()
	waited = true
	if runsFrom(pid, bin) {
		t.Errorf("runsFrom(%d) = true for a process that is gone", pid)
	}
}
