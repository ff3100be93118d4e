package cri

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"

	"github.com/kiln-runtime/kiln/integration/containerd"
)

// PauseRef is the name the harness's pause image is imported under, and CRI's sandbox image. It is the name
// containerd 2.4 uses by default, so a test configuration differs from a stock one only where it must.
const PauseRef = "registry.k8s.io/pause:3.10.2"

// BuildPauseImage builds the pause program (./integration/cri/pause under repoRoot, static, no cgo) and an
// image whose one layer holds it as /pause, its entrypoint.
func BuildPauseImage(ctx context.Context, repoRoot string) (*containerd.Image, error) {
	layer, err := staticProgramLayer(ctx, repoRoot, "./integration/cri/pause", "pause", 0o755)
	if err != nil {
		return nil, fmt.Errorf("build pause image: %w", err)
	}
	return containerd.BuildImage(containerd.ImageConfig{Entrypoint: []string{"/pause"}, User: "65535:65535"}, layer)
}

// staticProgramLayer builds a Go package of this module as a static binary (no cgo) and returns a layer
// holding it as /name with mode.
func staticProgramLayer(ctx context.Context, repoRoot, pkg, name string, mode int64) ([]byte, error) {
	dir, err := os.MkdirTemp("", "kiln-cri-build-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	bin := filepath.Join(dir, name)
	cmd := exec.CommandContext(ctx, goTool(), "build", "-trimpath", "-ldflags", "-s -w", "-o", bin, pkg)
	cmd.Dir = repoRoot
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux")
	if out, err := cmd.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("build %s: %w\n%s", pkg, err, out)
	}
	b, err := os.ReadFile(bin)
	if err != nil {
		return nil, err
	}
	return containerd.FilesLayer(containerd.LayerFile{Path: name, Mode: mode, Data: b})
}

// goTool is the go command that is running the tests, else the one on PATH.
func goTool() string {
	p := filepath.Join(runtime.GOROOT(), "bin", "go")
	if _, err := os.Stat(p); err == nil {
		return p
	}
	return "go"
}
