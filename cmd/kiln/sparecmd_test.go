package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"testing"
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
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
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
}
