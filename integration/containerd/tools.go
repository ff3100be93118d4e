package containerd

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"

	"golang.org/x/sys/unix"
)

// Pinned tool versions. containerd 2.2 writes OCI specs that Debian's runc 1.1 rejects, hence runc 1.3.
const (
	ContainerdVersion = "v2.2.9"
	RuncVersion       = "1.3.3"
	containerdModule  = "github.com/containerd/containerd/v2"
)

// Tools are the host binaries a private containerd needs.
type Tools struct {
	Dir        string
	Containerd string
	Ctr        string
	RuncShim   string
	Runc       string
}

// ToolsIn names the tool binaries inside dir without building anything.
func ToolsIn(dir string) Tools {
	return Tools{
		Dir:        dir,
		Containerd: filepath.Join(dir, "containerd"),
		Ctr:        filepath.Join(dir, "ctr"),
		RuncShim:   filepath.Join(dir, "containerd-shim-runc-v2"),
		Runc:       filepath.Join(dir, "runc"),
	}
}

// EnsureTools builds whichever tool in dir is missing or not at its pinned version: containerd, ctr and
// containerd-shim-runc-v2 with `go install` (about 70 s the first time), runc from the tools module under
// repoRoot/integration/containerd/tools. Concurrent callers (parallel test packages) are serialised by a lock
// file in dir.
func EnsureTools(ctx context.Context, repoRoot, dir string) (Tools, error) {
	t := ToolsIn(dir)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return t, fmt.Errorf("create tools dir %s: %w", dir, err)
	}
	lock, err := os.OpenFile(filepath.Join(dir, ".containerd-tools.lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return t, fmt.Errorf("open tools lock in %s: %w", dir, err)
	}
	defer lock.Close()
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX); err != nil {
		return t, fmt.Errorf("lock tools dir %s: %w", dir, err)
	}
	defer unix.Flock(int(lock.Fd()), unix.LOCK_UN) //nolint:errcheck

	want := strings.TrimPrefix(ContainerdVersion, "v")
	var missing []string
	for _, b := range []struct{ path, pkg string }{
		{t.Containerd, "cmd/containerd"},
		{t.Ctr, "cmd/ctr"},
		{t.RuncShim, "cmd/containerd-shim-runc-v2"},
	} {
		if !reportsVersion(ctx, want, b.path, "--version") && !reportsVersion(ctx, want, b.path, "-v") {
			missing = append(missing, containerdModule+"/"+b.pkg+"@"+ContainerdVersion)
		}
	}
	if len(missing) > 0 {
		cmd := exec.CommandContext(ctx, goTool(), append([]string{"install"}, missing...)...)
		cmd.Env = append(os.Environ(), "GOBIN="+dir)
		if out, err := cmd.CombinedOutput(); err != nil {
			return t, fmt.Errorf("go install %s: %w\n%s", strings.Join(missing, " "), err, out)
		}
	}
	if !reportsVersion(ctx, RuncVersion, t.Runc, "--version") {
		cmd := exec.CommandContext(ctx, goTool(), "build", "-tags", "seccomp", "-o", t.Runc, "github.com/opencontainers/runc")
		cmd.Dir = filepath.Join(repoRoot, "integration", "containerd", "tools")
		if out, err := cmd.CombinedOutput(); err != nil {
			return t, fmt.Errorf("build runc %s (needs libseccomp-dev) in %s: %w\n%s", RuncVersion, cmd.Dir, err, out)
		}
	}
	return t, nil
}

// reportsVersion runs `bin flag` and looks for version in its output.
func reportsVersion(ctx context.Context, version, bin, flag string) bool {
	if _, err := os.Stat(bin); err != nil {
		return false
	}
	out, err := exec.CommandContext(ctx, bin, flag).CombinedOutput()
	return err == nil && strings.Contains(string(out), version)
}

// goTool is the go command that is running the tests, else the one on PATH.
func goTool() string {
	if p := filepath.Join(runtime.GOROOT(), "bin", "go"); fileExists(p) {
		return p
	}
	return "go"
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}
