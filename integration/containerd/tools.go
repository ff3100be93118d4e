package containerd

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strings"

	"golang.org/x/sys/unix"
)

// Pinned tool versions. The suite, `make demo` and the bench run ContainerdVersion; a smoke run also passes
// against ContainerdSmokeVersion, the line many Kubernetes nodes run. RuncVersion is the runc the tools module
// (integration/containerd/tools/go.mod) requires: the one whose libcontainer the agent links.
const (
	ContainerdVersion      = "v2.4.2"
	ContainerdSmokeVersion = "v2.2.9"
	RuncVersion            = "1.5.3"
	containerdModule       = "github.com/containerd/containerd/v2"
)

// Tools are the host binaries a private containerd needs.
type Tools struct {
	Dir string
	// Version is the containerd release Containerd and Ctr come from.
	Version    string
	Containerd string
	Ctr        string
	// RuncShim is containerd-shim-runc-v2 of ContainerdVersion (containerd finds it on PATH by that name, so
	// there is one per tools directory).
	RuncShim string
	Runc     string
}

// ToolsIn names the tool binaries of ContainerdVersion inside dir without building anything.
func ToolsIn(dir string) Tools {
	return ToolsFor(dir, ContainerdVersion)
}

// ToolsFor names the tool binaries of a containerd version inside dir without building anything.
// ContainerdVersion's containerd and ctr have their plain names; any other version's carry it
// (containerd-v2.2.9, ctr-v2.2.9), so that several versions are cached side by side.
func ToolsFor(dir, version string) Tools {
	suffix := ""
	if version != ContainerdVersion {
		suffix = "-" + version
	}
	return Tools{
		Dir:        dir,
		Version:    version,
		Containerd: filepath.Join(dir, "containerd"+suffix),
		Ctr:        filepath.Join(dir, "ctr"+suffix),
		RuncShim:   filepath.Join(dir, "containerd-shim-runc-v2"),
		Runc:       filepath.Join(dir, "runc"),
	}
}

// EnsureTools builds whichever tool of ContainerdVersion in dir is missing or not at its pinned version (see
// EnsureToolsFor).
func EnsureTools(ctx context.Context, repoRoot, dir string) (Tools, error) {
	return EnsureToolsFor(ctx, repoRoot, dir, ContainerdVersion)
}

// EnsureToolsFor builds whichever tool in dir is missing or not at its pinned version: containerd and ctr of
// version and containerd-shim-runc-v2 of ContainerdVersion with `go install` (about 70 s the first time), runc
// from the tools module under repoRoot/integration/containerd/tools. Concurrent callers (parallel test
// packages) are serialised by a lock file in dir.
func EnsureToolsFor(ctx context.Context, repoRoot, dir, version string) (Tools, error) {
	t := ToolsFor(dir, version)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return t, fmt.Errorf("create tools dir %s: %w", dir, err)
	}
	unlock, err := lockTools(dir)
	if err != nil {
		return t, err
	}
	defer unlock()

	type tool struct{ path, pkg, version string }
	var missing []tool
	for _, b := range []tool{
		{t.Containerd, "cmd/containerd", version},
		{t.Ctr, "cmd/ctr", version},
		{t.RuncShim, "cmd/containerd-shim-runc-v2", ContainerdVersion},
	} {
		want := strings.TrimPrefix(b.version, "v")
		if !reportsVersion(ctx, want, b.path, "--version") && !reportsVersion(ctx, want, b.path, "-v") {
			missing = append(missing, b)
		}
	}
	// One `go install` per version builds its binaries in parallel.
	byVersion := map[string]map[string]string{}
	for _, b := range missing {
		if byVersion[b.version] == nil {
			byVersion[b.version] = map[string]string{}
		}
		byVersion[b.version][containerdModule+"/"+b.pkg] = b.path
	}
	for v, bins := range byVersion {
		if err := goInstall(ctx, v, bins); err != nil {
			return t, err
		}
	}
	if err := ensureRunc(ctx, repoRoot, t.Runc); err != nil {
		return t, err
	}
	return t, nil
}

// EnsureRunc builds runc RuncVersion into dir/runc when it is missing or at another version, and returns its
// path.
func EnsureRunc(ctx context.Context, repoRoot, dir string) (string, error) {
	bin := ToolsIn(dir).Runc
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return bin, fmt.Errorf("create tools dir %s: %w", dir, err)
	}
	unlock, err := lockTools(dir)
	if err != nil {
		return bin, err
	}
	defer unlock()
	return bin, ensureRunc(ctx, repoRoot, bin)
}

// ensureRunc builds runc from the tools module: runc's own module has a replace directive, so `go install
// runc@version` refuses it, but as a requirement of another module it builds. The caller holds the lock.
func ensureRunc(ctx context.Context, repoRoot, bin string) error {
	if reportsVersion(ctx, RuncVersion, bin, "--version") {
		return nil
	}
	cmd := exec.CommandContext(ctx, goTool(), "build", "-trimpath", "-tags", "seccomp", "-o", bin, "github.com/opencontainers/runc")
	cmd.Dir = filepath.Join(repoRoot, "integration", "containerd", "tools")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=1", "GOWORK=off")
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("build runc %s (needs libseccomp-dev) in %s: %w\n%s", RuncVersion, cmd.Dir, err, out)
	}
	if !reportsVersion(ctx, RuncVersion, bin, "--version") {
		return fmt.Errorf("runc built in %s does not report version %s: check the tools module's go.mod", cmd.Dir, RuncVersion)
	}
	return nil
}

// goInstall runs `go install pkg@version` for each package of bins (package -> destination) into a scratch
// GOBIN beside the destinations and moves each binary to its destination, so that binaries can be cached under
// versioned names.
func goInstall(ctx context.Context, version string, bins map[string]string) error {
	var pkgs []string
	dir := ""
	for pkg, dst := range bins {
		pkgs = append(pkgs, pkg+"@"+version)
		dir = filepath.Dir(dst)
	}
	sort.Strings(pkgs)
	what := strings.Join(pkgs, " ")
	gobin, err := os.MkdirTemp(dir, ".go-install-")
	if err != nil {
		return fmt.Errorf("go install %s: %w", what, err)
	}
	defer os.RemoveAll(gobin)
	cmd := exec.CommandContext(ctx, goTool(), append([]string{"install"}, pkgs...)...)
	cmd.Env = append(os.Environ(), "GOBIN="+gobin, "GOWORK=off")
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go install %s: %w\n%s", what, err, out)
	}
	for pkg, dst := range bins {
		if err := os.Rename(filepath.Join(gobin, filepath.Base(pkg)), dst); err != nil {
			return fmt.Errorf("go install %s: %w", what, err)
		}
	}
	return nil
}

// lockTools takes the tools directory's lock file; the returned function releases it.
func lockTools(dir string) (func(), error) {
	lock, err := os.OpenFile(filepath.Join(dir, ".containerd-tools.lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, fmt.Errorf("open tools lock in %s: %w", dir, err)
	}
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX); err != nil {
		lock.Close()
		return nil, fmt.Errorf("lock tools dir %s: %w", dir, err)
	}
	return func() {
		_ = unix.Flock(int(lock.Fd()), unix.LOCK_UN)
		lock.Close()
	}, nil
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
