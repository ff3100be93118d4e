package containerd

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/kiln-runtime/kiln/config"
)

// The harness's own settings and a test's extra settings end up in one valid configuration, whatever tables the
// extra settings use; the test's win.
func TestWriteKilnConfigMergesExtra(t *testing.T) {
	assets := t.TempDir()
	for _, f := range []string{"vmlinuz", "initrd.img"} {
		if err := os.WriteFile(filepath.Join(assets, f), nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	path := filepath.Join(t.TempDir(), "kiln.toml")
	extra := "[hypervisor]\nfast_start = \"off\"\n[agent]\nrequest_timeout = \"7s\"\n[runtime]\nlog_level = \"info\"\n"
	if err := WriteKilnConfig(path, assets, "/run/kiln-test", extra); err != nil {
		t.Fatal(err)
	}
	c, err := config.Load(path)
	if err != nil {
		t.Fatal(err)
	}
	if c.Hypervisor.Kernel != filepath.Join(assets, "vmlinuz") || c.Hypervisor.FastStart != config.FastStartOff ||
		c.Agent.RequestTimeout.Std().String() != "7s" || c.Runtime.StateDir != "/run/kiln-test" || c.Runtime.LogLevel != "info" {
		t.Errorf("configuration %+v", c)
	}
}
