package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"time"

	"github.com/kiln-runtime/kiln/integration/containerd"
)

// ensureRunc returns the runc binary under tools that the containerd harness builds from its tools module
// (integration/containerd/tools): containerd.RuncVersion, the runc whose libcontainer the agent links. The bench
// runs from the repository root (`make bench`).
func ensureRunc(ctx context.Context, tools string) (string, error) {
	repo, err := os.Getwd()
	if err != nil {
		return "", fmt.Errorf("locate the repository: %w", err)
	}
	tools, err = filepath.Abs(tools)
	if err != nil {
		return "", fmt.Errorf("locate tools dir: %w", err)
	}
	start := time.Now()
	bin, err := containerd.EnsureRunc(ctx, repo, tools)
	if err != nil {
		return "", err
	}
	if d := time.Since(start); d > 5*time.Second {
		fmt.Fprintf(os.Stderr, "bench: built runc %s in %s\n", containerd.RuncVersion, d.Round(time.Second))
	}
	return bin, nil
}

// runcContainer is a detached runc container of the benchmark bundle.
type runcContainer struct {
	bin, root, id string
}

func startRunc(ctx context.Context, bin, work, bundle, id string) (*runcContainer, error) {
	r := &runcContainer{bin: bin, root: filepath.Join(work, "runc-root"), id: id}
	// A detached container without a terminal inherits runc's stdio. A pipe there would stay open as long as the
	// container runs (and `runc run` would never seem to end), so its errors go to a file.
	errFile, err := os.CreateTemp(work, "runc-run-stderr-")
	if err != nil {
		return nil, err
	}
	defer errFile.Close()
	cmd := exec.CommandContext(ctx, bin, "--root", r.root, "run", "--detach", "--bundle", bundle, id)
	cmd.Stderr = errFile
	if err := cmd.Run(); err != nil {
		_ = r.delete()
		msg, _ := os.ReadFile(errFile.Name())
		return nil, fmt.Errorf("runc run %s: %v: %s", id, err, msg)
	}
	return r, nil
}

// exec runs args in the container with stdout going to w and returns how long `runc exec` took.
func (r *runcContainer) exec(ctx context.Context, w io.Writer, args ...string) (time.Duration, error) {
	cmd := exec.CommandContext(ctx, r.bin, append([]string{"--root", r.root, "exec", r.id}, args...)...)
	cmd.Stdout = w
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	start := time.Now()
	err := cmd.Run()
	d := time.Since(start)
	if err != nil {
		return 0, fmt.Errorf("runc exec %v: %v: %s", args, err, stderr.String())
	}
	return d, nil
}

func (r *runcContainer) delete() error {
	out, err := exec.Command(r.bin, "--root", r.root, "delete", "--force", r.id).CombinedOutput()
	if err != nil {
		return fmt.Errorf("runc delete %s: %v: %s", r.id, err, out)
	}
	return nil
}
