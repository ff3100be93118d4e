package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestDefaultsAreValid(t *testing.T) {
	if err := Default().Validate(); err != nil {
		t.Fatal(err)
	}
}

func TestParse(t *testing.T) {
	dir := t.TempDir()
	kernel := filepath.Join(dir, "vmlinuz")
	if err := os.WriteFile(kernel, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name    string
		toml    string
		errPart []string
		check   func(t *testing.T, c Config)
	}{
		{name: "empty file is the defaults", toml: "", check: func(t *testing.T, c Config) {
			if c.Hypervisor.MemoryMiB != Default().Hypervisor.MemoryMiB {
				t.Errorf("memory_mib %d", c.Hypervisor.MemoryMiB)
			}
		}},
		{name: "values", toml: `
[hypervisor]
path = "/usr/bin/qemu-system-x86_64"
accelerator = "tcg"
vcpus = 2
memory_mib = 512
kernel_params = ["foo=1"]
stop_timeout = "5s"
[vsock]
mode = "vhost-user"
[agent]
debug = true
dial_timeout = "10s"
request_timeout = "250ms"
[runtime]
state_dir = "/tmp/kiln"
log_level = "debug"
`, check: func(t *testing.T, c Config) {
			h := c.Hypervisor
			if h.Path != "/usr/bin/qemu-system-x86_64" || h.Accelerator != "tcg" || h.VCPUs != 2 || h.MemoryMiB != 512 ||
				len(h.KernelParams) != 1 || h.StopTimeout.Std() != 5*time.Second {
				t.Errorf("hypervisor %+v", h)
			}
			if c.Vsock.Mode != "vhost-user" || !c.Agent.Debug || c.Agent.DialTimeout.Std() != 10*time.Second ||
				c.Agent.RequestTimeout.Std() != 250*time.Millisecond || c.Runtime.StateDir != "/tmp/kiln" {
				t.Errorf("config %+v", c)
			}
		}},
		{name: "kernel path exists", toml: "[hypervisor]\nkernel = \"" + kernel + "\"\n"},
		{name: "wrong type names the key", toml: "[hypervisor]\nmemory_mib = \"lots\"\n", errPart: []string{"memory_mib"}},
		{name: "unknown key is named", toml: "[hypervisor]\nmemory_mb = 512\n", errPart: []string{"hypervisor.memory_mb", "unknown"}},
		{name: "unknown table is named", toml: "[hypervisr]\npath = \"x\"\n", errPart: []string{"hypervisr"}},
		{name: "bad duration", toml: "[agent]\ndial_timeout = \"soon\"\n", errPart: []string{"dial_timeout", "duration"}},
		{name: "accelerator enum", toml: "[hypervisor]\naccelerator = \"xen\"\n", errPart: []string{"hypervisor.accelerator", "\"tcg\""}},
		{name: "vcpus range", toml: "[hypervisor]\nvcpus = 0\n", errPart: []string{"hypervisor.vcpus", "1 to 255"}},
		{name: "memory range", toml: "[hypervisor]\nmemory_mib = 16\n", errPart: []string{"hypervisor.memory_mib", "64"}},
		{name: "vsock enum", toml: "[vsock]\nmode = \"tcp\"\n", errPart: []string{"vsock.mode"}},
		{name: "missing kernel reported at load", toml: "[hypervisor]\nkernel = \"/nonexistent/vmlinuz\"\n", errPart: []string{"hypervisor.kernel", "/nonexistent/vmlinuz", "make image"}},
		{name: "relative state dir", toml: "[runtime]\nstate_dir = \"run\"\n", errPart: []string{"runtime.state_dir", "absolute"}},
		{name: "negative timeout", toml: "[agent]\nrequest_timeout = \"-1s\"\n", errPart: []string{"agent.request_timeout"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "config.toml")
			if err := os.WriteFile(path, []byte(tt.toml), 0o644); err != nil {
				t.Fatal(err)
			}
			c, err := Load(path)
			if len(tt.errPart) > 0 {
				if err == nil {
					t.Fatal("no error")
				}
				for _, p := range append(tt.errPart, path) {
					if !strings.Contains(err.Error(), p) {
						t.Errorf("error does not mention %q: %v", p, err)
					}
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if c.Source != path {
				t.Errorf("source %q, want %q", c.Source, path)
			}
			if tt.check != nil {
				tt.check(t, c)
			}
		})
	}
}

func TestResolutionOrder(t *testing.T) {
	dir := t.TempDir()
	system := filepath.Join(dir, "system.toml")
	explicit := filepath.Join(dir, "explicit.toml")
	write := func(path, body string) {
		if err := os.WriteFile(path, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	c, err := load("", system)
	if err != nil || c.Source != "" || c.Hypervisor.VCPUs != Default().Hypervisor.VCPUs {
		t.Fatalf("no files: want defaults, got %+v, %v", c, err)
	}
	write(system, "[hypervisor]\nvcpus = 2\n")
	c, err = load("", system)
	if err != nil || c.Source != system || c.Hypervisor.VCPUs != 2 {
		t.Fatalf("system file: got source %q vcpus %d, %v", c.Source, c.Hypervisor.VCPUs, err)
	}
	write(explicit, "[hypervisor]\nvcpus = 3\n")
	c, err = load(explicit, system)
	if err != nil || c.Source != explicit || c.Hypervisor.VCPUs != 3 {
		t.Fatalf("explicit file: got source %q vcpus %d, %v", c.Source, c.Hypervisor.VCPUs, err)
	}
	if _, err := load(filepath.Join(dir, "missing.toml"), system); err == nil || !strings.Contains(err.Error(), "missing.toml") {
		t.Fatalf("missing explicit file: %v", err)
	}
}

func TestResolveAssets(t *testing.T) {
	dir := t.TempDir()
	c := Default()
	c.Hypervisor.Kernel = filepath.Join(dir, "vmlinuz")
	if _, err := c.ResolveAssets(); err == nil || !strings.Contains(err.Error(), "together") {
		t.Fatalf("kernel without initrd: %v", err)
	}
	c.Hypervisor.Initrd = filepath.Join(dir, "initrd.img")
	if _, err := c.ResolveAssets(); err == nil || !strings.Contains(err.Error(), "make image") {
		t.Fatalf("missing files: %v", err)
	}
	for _, f := range []string{c.Hypervisor.Kernel, c.Hypervisor.Initrd} {
		if err := os.WriteFile(f, nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	a, err := c.ResolveAssets()
	if err != nil || a.Kernel != c.Hypervisor.Kernel || a.Initrd != c.Hypervisor.Initrd {
		t.Fatalf("got %+v, %v", a, err)
	}
}
