package manager

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/containerd/errdefs"

	"github.com/kiln-runtime/kiln/runtime/bundle"
	"github.com/kiln-runtime/kiln/runtime/task"
)

func TestGroup(t *testing.T) {
	for _, tc := range []struct {
		name        string
		annotations map[string]string
		want        string
	}{
		{"standalone container", nil, "ctr-1"},
		{"pod container", map[string]string{SandboxAnnotation: "pod-9"}, "pod-9"},
		{"empty sandbox id", map[string]string{SandboxAnnotation: ""}, "ctr-1"},
	} {
		if got := Group("ctr-1", tc.annotations); got != tc.want {
			t.Errorf("%s: group %q, want %q", tc.name, got, tc.want)
		}
	}
}

func TestBundleAnnotations(t *testing.T) {
	dir := t.TempDir()
	spec := `{"ociVersion":"1.2.0","annotations":{"io.kubernetes.cri.sandbox-id":"pod-1"}}`
	if err := os.WriteFile(filepath.Join(dir, "config.json"), []byte(spec), 0o644); err != nil {
		t.Fatal(err)
	}
	a, err := bundle.Annotations(dir)
	if err != nil || Group("c", a) != "pod-1" {
		t.Fatalf("annotations %v, %v", a, err)
	}
}

func TestCleanupRemovesWhatADeadShimLeft(t *testing.T) {
	state := t.TempDir()
	rec := task.Record{VMID: "kiln-test", StateDir: state, ShareDir: filepath.Join(state, "kiln-test.share"), ShimPid: 0}
	vmDir := filepath.Join(state, rec.VMID)
	for _, d := range []string{vmDir, rec.ShareDir} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	// A process still naming the VM's state directory stands for a QEMU that outlived its shim.
	orphan := exec.Command("sh", "-c", "while :; do sleep 0.1; done", "sh", vmDir+"/qmp.sock")
	if err := orphan.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { _ = orphan.Wait(); close(done) }()
	if err := Cleanup(context.Background(), rec); err != nil {
		t.Fatal(err)
	}
	// Cleanup returns once the process is dead (a zombie counts); reaping it here may take a moment more.
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Error("process naming the VM state survived cleanup")
	}
	for _, d := range []string{vmDir, rec.ShareDir} {
		if _, err := os.Stat(d); !os.IsNotExist(err) {
			t.Errorf("%s still exists (%v)", d, err)
		}
	}
}

func TestCleanupLeavesALiveShimAlone(t *testing.T) {
	state := t.TempDir()
	// A process whose command line names the shim binary stands for the group's running shim.
	shim := exec.Command("sh", "-c", "while :; do sleep 0.1; done", "containerd-shim-kiln-v2")
	if err := shim.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = shim.Process.Kill(); _ = shim.Wait() }()
	rec := task.Record{VMID: "kiln-live", StateDir: state, ShimPid: shim.Process.Pid}
	if err := os.MkdirAll(filepath.Join(state, rec.VMID), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := Cleanup(context.Background(), rec); !errdefs.IsFailedPrecondition(err) {
		t.Fatalf("cleanup with a live shim: %v, want FailedPrecondition", err)
	}
	if _, err := os.Stat(filepath.Join(state, rec.VMID)); err != nil {
		t.Errorf("live shim's VM state removed: %v", err)
	}
}
