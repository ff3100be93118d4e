package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// runcVersion is the runc the baseline runs: the one whose libcontainer the agent links.
const runcVersion = "v1.3.3"

// ensureRunc returns a runc binary of runcVersion under tools, building it from a small module of its own when
// it is missing. runc's own module has a replace directive, so `go install` refuses it; as a requirement of
// another module it builds. seccomp support needs libseccomp's headers; without them runc is built without it
// (the benchmark's bundle has no seccomp profile).
func ensureRunc(ctx context.Context, tools string) (string, error) {
	bin, err := filepath.Abs(filepath.Join(tools, "runc"))
	if err != nil {
		return "", err
	}
	if out, err := exec.CommandContext(ctx, bin, "--version").Output(); err == nil && strings.Contains(string(out), strings.TrimPrefix(runcVersion, "v")) {
		return bin, nil
	}
	src := filepath.Join(filepath.Dir(bin), "..", "runc-build")
	if err := os.MkdirAll(src, 0o755); err != nil {
		return "", err
	}
	gomod := "module kiln.invalid/runc-build\n\ngo 1.24\n\nrequire github.com/opencontainers/runc " + runcVersion + "\n"
	toolsGo := "//go:build tools\n\n// Package tools pins runc so that `go build github.com/opencontainers/runc` builds it.\npackage tools\n\nimport _ \"github.com/opencontainers/runc\"\n"
	for name, content := range map[string]string{"go.mod": gomod, "tools.go": toolsGo} {
		if err := os.WriteFile(filepath.Join(src, name), []byte(content), 0o644); err != nil {
			return "", err
		}
	}
	tags := ""
	if exec.CommandContext(ctx, "pkg-config", "--exists", "libseccomp").Run() == nil {
		tags = "seccomp"
	} else {
		fmt.Fprintln(os.Stderr, "bench: libseccomp headers not found; building runc without seccomp")
	}
	steps := [][]string{
		{"go", "mod", "tidy"},
		{"go", "build", "-trimpath", "-tags", tags, "-o", bin, "github.com/opencontainers/runc"},
	}
	start := time.Now()
	for _, s := range steps {
		cmd := exec.CommandContext(ctx, s[0], s[1:]...)
		cmd.Dir = src
		cmd.Env = append(os.Environ(), "CGO_ENABLED=1", "GOFLAGS=-mod=mod", "GOWORK=off")
		if out, err := cmd.CombinedOutput(); err != nil {
			return "", fmt.Errorf("build runc %s (%s): %v\n%s", runcVersion, strings.Join(s, " "), err, out)
		}
	}
	fmt.Fprintf(os.Stderr, "bench: built runc %s in %s\n", runcVersion, time.Since(start).Round(time.Second))
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
