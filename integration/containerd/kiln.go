package containerd

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/pelletier/go-toml/v2"
)

// RuntimeName is Kiln's runtime type, which containerd maps to the binary containerd-shim-kiln-v2 on its PATH.
const RuntimeName = "io.containerd.kiln.v2"

// ShimBinary is the shim's file name.
const ShimBinary = "containerd-shim-kiln-v2"

// ShimRaceEnv, set to 1, makes BuildShim build the shim with Go's race detector (`make race`).
const ShimRaceEnv = "KILN_SHIM_RACE"

// BuildShim builds the shim from repoRoot into dir and returns dir (to put first on containerd's PATH).
func BuildShim(ctx context.Context, repoRoot, dir string) (string, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("create shim dir: %w", err)
	}
	args := []string{"build", "-trimpath", "-o", filepath.Join(dir, ShimBinary)}
	if os.Getenv(ShimRaceEnv) == "1" {
		args = append(args, "-race")
	}
	cmd := exec.CommandContext(ctx, goTool(), append(args, "./cmd/"+ShimBinary)...)
	cmd.Dir = repoRoot
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("build %s: %w\n%s", ShimBinary, err, out)
	}
	return dir, nil
}

// KilnConfig writes a Kiln configuration for the shim into d's directory: VM state under it too, and the guest
// kernel and initramfs from assetDir (the build's share/kiln). It returns the file's path, for ctr's
// --runtime-config-path.
func (d *Daemon) KilnConfig(assetDir string, extra string) (string, error) {
	path := filepath.Join(d.Dir, "kiln.toml")
	return path, WriteKilnConfig(path, assetDir, d.StateDir(), extra)
}

// WriteKilnConfig writes a Kiln configuration into path: the guest kernel and initramfs from assetDir, VM
// state in stateDir, debug logs, and the settings of extra (TOML; any table, its keys win).
func WriteKilnConfig(path, assetDir, stateDir, extra string) error {
	for _, f := range []string{"vmlinuz", "initrd.img"} {
		if _, err := os.Stat(filepath.Join(assetDir, f)); err != nil {
			return fmt.Errorf("guest image missing (%w): run `make image`", err)
		}
	}
	cfg := map[string]any{}
	if err := toml.Unmarshal([]byte(extra), &cfg); err != nil {
		return fmt.Errorf("extra kiln config %q: %w", extra, err)
	}
	for table, keys := range map[string]map[string]any{
		"hypervisor": {"kernel": filepath.Join(assetDir, "vmlinuz"), "initrd": filepath.Join(assetDir, "initrd.img")},
		"runtime":    {"state_dir": stateDir, "log_level": "debug"},
	} {
		t, ok := cfg[table].(map[string]any)
		if !ok {
			t = map[string]any{}
			cfg[table] = t
		}
		for k, v := range keys {
			if _, set := t[k]; !set {
				t[k] = v
			}
		}
	}
	b, err := toml.Marshal(cfg)
	if err != nil {
		return fmt.Errorf("write kiln config: %w", err)
	}
	if err := os.WriteFile(path, b, 0o644); err != nil {
		return fmt.Errorf("write kiln config: %w", err)
	}
	return nil
}

// StateDir is the Kiln state directory the harness's configuration names (one per containerd).
func (d *Daemon) StateDir() string { return filepath.Join(d.Dir, "kiln") }

// KilnRunArgs are the `ctr run` arguments that select Kiln with the configuration at cfg.
func KilnRunArgs(cfg string) []string {
	return []string{"--runtime", RuntimeName, "--runtime-config-path", cfg}
}

// GuestKernelRelease reads the kernel release the guest image was built with.
func GuestKernelRelease(assetDir string) (string, error) {
	b, err := os.ReadFile(filepath.Join(assetDir, "kernel-release"))
	if err != nil {
		return "", fmt.Errorf("read guest kernel release: %w", err)
	}
	return strings.TrimSpace(string(b)), nil
}
