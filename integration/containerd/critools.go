package containerd

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
)

// CRIToolsVersion is the cri-tools release crictl and critest are built from.
const CRIToolsVersion = "v1.37.0"

const criToolsModule = "sigs.k8s.io/cri-tools"

// CRITools are crictl and critest of CRIToolsVersion.
type CRITools struct {
	Crictl  string
	Critest string
}

// CRIToolsIn names crictl and critest inside dir without building anything.
func CRIToolsIn(dir string) CRITools {
	return CRITools{Crictl: filepath.Join(dir, "crictl"), Critest: filepath.Join(dir, "critest")}
}

// EnsureCRITools builds crictl in dir, and critest when asked, if missing or not at CRIToolsVersion: crictl
// with `go install`, critest (a Ginkgo suite that cri-tools builds with `go test -c ./cmd/critest`) the same
// way inside the module's source as the module proxy serves it. Both carry the version through cri-tools'
// version variable. critest takes a few minutes the first time, so only `make critest` asks for it.
func EnsureCRITools(ctx context.Context, dir string, critest bool) (CRITools, error) {
	t := CRIToolsIn(dir)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return t, fmt.Errorf("create tools dir %s: %w", dir, err)
	}
	unlock, err := lockTools(dir)
	if err != nil {
		return t, err
	}
	defer unlock()
	ldflags := "-X " + criToolsModule + "/pkg/version.Version=" + CRIToolsVersion
	if !reportsVersion(ctx, CRIToolsVersion, t.Crictl, "--version") {
		gobin, err := os.MkdirTemp(dir, ".go-install-")
		if err != nil {
			return t, err
		}
		defer os.RemoveAll(gobin)
		cmd := exec.CommandContext(ctx, goTool(), "install", "-trimpath", "-ldflags", ldflags,
			criToolsModule+"/cmd/crictl@"+CRIToolsVersion)
		cmd.Env = append(os.Environ(), "GOBIN="+gobin, "GOWORK=off", "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			return t, fmt.Errorf("go install crictl %s: %w\n%s", CRIToolsVersion, err, out)
		}
		if err := os.Rename(filepath.Join(gobin, "crictl"), t.Crictl); err != nil {
			return t, fmt.Errorf("install crictl: %w", err)
		}
	}
	if critest && !reportsVersion(ctx, CRIToolsVersion, t.Critest, "-version") {
		src, err := moduleSource(ctx, criToolsModule, CRIToolsVersion)
		if err != nil {
			return t, err
		}
		cmd := exec.CommandContext(ctx, goTool(), "test", "-c", "-trimpath", "-ldflags", ldflags, "-o", t.Critest, "./cmd/critest")
		cmd.Dir = src
		// The module cache is read-only; -mod=mod lets go fill in what the module's go.sum lists.
		cmd.Env = append(os.Environ(), "GOWORK=off", "GOFLAGS=-mod=mod", "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			return t, fmt.Errorf("build critest %s in %s: %w\n%s", CRIToolsVersion, src, err, out)
		}
		if !reportsVersion(ctx, CRIToolsVersion, t.Critest, "-version") {
			return t, fmt.Errorf("critest built in %s does not report version %s", src, CRIToolsVersion)
		}
	}
	return t, nil
}

// moduleSource downloads module@version through the module proxy (`go mod download`) and returns its directory
// in the module cache.
func moduleSource(ctx context.Context, module, version string) (string, error) {
	cmd := exec.CommandContext(ctx, goTool(), "mod", "download", "-json", module+"@"+version)
	cmd.Env = append(os.Environ(), "GOWORK=off", "GOFLAGS=-mod=mod")
	cmd.Dir = os.TempDir()
	out, err := cmd.Output()
	var info struct{ Dir, Error string }
	if jerr := json.Unmarshal(out, &info); jerr != nil || info.Dir == "" {
		return "", fmt.Errorf("go mod download %s@%s: %v %s", module, version, err, info.Error)
	}
	return info.Dir, nil
}
