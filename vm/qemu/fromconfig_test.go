package qemu

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sirupsen/logrus"
	logtest "github.com/sirupsen/logrus/hooks/test"

	"github.com/kiln-runtime/kiln/config"
	"github.com/kiln-runtime/kiln/vm/virtiofs"
)

func TestConfigFromCarriesEveryMachineKey(t *testing.T) {
	cfg, _ := startableConfig(t)
	cfg.Hypervisor.VCPUs, cfg.Hypervisor.MemoryMiB = 2, 384
	cfg.Hypervisor.KernelParams = []string{"foo=1"}
	cfg.SharedFS.Virtiofsd, cfg.SharedFS.Cache = "/opt/virtiofsd", "always"
	cfg.Agent.Debug = true
	cfg.Runtime.StateDir = "/tmp/kiln-state"
	got, err := ConfigFrom(cfg, "vm1", logrus.NewEntry(logrus.New()))
	if err != nil {
		t.Fatal(err)
	}
	if got.ID != "vm1" || got.StateRoot != "/tmp/kiln-state" || got.Accel != "tcg" || got.VCPUs != 2 || got.MemoryMiB != 384 ||
		got.Kernel != cfg.Hypervisor.Kernel || got.Initrd != cfg.Hypervisor.Initrd || got.Vsock != VsockVhostUser ||
		got.StopTimeout != cfg.Hypervisor.StopTimeout.Std() || got.TemplateDir != "/dev/shm/kiln/templates" {
		t.Errorf("machine config %+v", got)
	}
	cfg.Hypervisor.FastStart = config.FastStartOff
	if got, err := ConfigFrom(cfg, "vm1", logrus.NewEntry(logrus.New())); err != nil || got.TemplateDir != "" {
		t.Errorf("fast_start = \"off\": template directory %q (%v), want none", got.TemplateDir, err)
	}
	if got.Virtiofsd.Binary != "/opt/virtiofsd" || got.Virtiofsd.Cache != virtiofs.CacheAlways {
		t.Errorf("virtiofsd config %+v, want binary /opt/virtiofsd cache always", got.Virtiofsd)
	}
	if len(got.KernelParams) != 2 || got.KernelParams[0] != "foo=1" || got.KernelParams[1] != "kiln.debug=1" {
		t.Errorf("kernel params %v", got.KernelParams)
	}
}

// A boot looks at the guest kernel and initrd once: Start trusts the files ConfigFrom's config.ResolveAssets just
// found, and checks any others itself.
func TestStartLooksOnlyForAssetsNotResolved(t *testing.T) {
	tests := []struct {
		name    string
		mutate  func(*Config)
		wantErr string
	}{
		{"resolved by ConfigFrom", nil, "QEMU exited before its QMP socket answered"},
		{"kernel changed after ConfigFrom", func(c *Config) { c.Kernel += ".other" }, "(run `make image`"},
		{"initrd changed after ConfigFrom", func(c *Config) { c.Initrd += ".other" }, "(run `make image`"},
		{"not from ConfigFrom", func(c *Config) { c.resolvedAssets = config.Assets{} }, "(run `make image`"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			// This test is about the asset lookup: QEMU as root, no cgroup (TestReachable covers the user).
			cfg, _ := startableConfig(t)
			mc := quietConfig(t, cfg)
			// QEMU stand-in: exits at once, so a Start that got past the asset check fails waiting for QMP.
			mc.QEMU = "/bin/false"
			mc.TSCkHz = 1
			for _, f := range []string{cfg.Hypervisor.Kernel, cfg.Hypervisor.Initrd} {
				if err := os.Remove(f); err != nil {
					t.Fatal(err)
				}
			}
			if tt.mutate != nil {
				tt.mutate(&mc)
			}
			m, err := startFailing(t, mc)
			if !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("Start: %v, want an error about %q", err, tt.wantErr)
			}
			if _, err := os.Stat(m.StateDir()); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("state dir left behind: %v", err)
			}
		})
	}
}

// "auto" never takes the kernel's vhost-vsock, even where it opens: through it the guest could connect to every
// AF_VSOCK listener of the host (issue 11, finding 14). Only an explicit "vhost" does.
func TestResolveVsockModeAutoKeepsTheGuestToKilnsPorts(t *testing.T) {
	usable := func() error { return nil }
	missing := func() error { return errors.New("cannot open /dev/vhost-vsock: no such file") }
	for _, tc := range []struct {
		mode    string
		kernel  func() error
		want    VsockMode
		wantErr string
	}{
		{"auto", usable, VsockVhostUser, ""},
		{"", usable, VsockVhostUser, ""},
		{"auto", missing, VsockVhostUser, ""},
		{"vhost-user", usable, VsockVhostUser, ""},
		{"vhost", usable, VsockKernel, ""},
		{"vhost", missing, "", `vsock.mode = "vhost": cannot open /dev/vhost-vsock`},
		{"virtio", usable, "", `vsock.mode = "virtio": want`},
	} {
		got, err := resolveVsockMode(tc.mode, tc.kernel)
		if tc.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("mode %q: error %v, want one containing %q", tc.mode, err, tc.wantErr)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("mode %q: %q, %v; want %q", tc.mode, got, err, tc.want)
		}
	}
}

// A template that cannot be built (QEMU exits at once) is warned about and the VM boots the usual way; neither
// attempt leaves anything: no template, no RAM copy, no state directory.
func TestStartFromTemplateFallsBackAndLeavesNothing(t *testing.T) {
	cfg, state := startableConfig(t)
	// Templates apply only on tmpfs.
	shm, err := os.MkdirTemp("/dev/shm", "kiln-test-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(shm) })
	if why := TemplateDirUnusable(shm, Statfs); why != "" {
		t.Fatal(why)
	}
	cfg.Hypervisor.FastStart, cfg.Hypervisor.TemplateDir = config.FastStartTemplate, filepath.Join(shm, "templates")
	log := logrus.New()
	log.SetOutput(io.Discard)
	hook := new(logtest.Hook)
	log.AddHook(hook)
	mc, err := ConfigFrom(cfg, "vm1", logrus.NewEntry(log))
	if err != nil {
		t.Fatal(err)
	}
	mc.QEMU = "/bin/false"
	mc.TSCkHz = 1
	mc.Virtiofsd.Binary = "/bin/true"
	mc.SharedDir = t.TempDir()
	startFailing(t, mc)
	var warned bool
	for _, e := range hook.AllEntries() {
		warned = warned || e.Level == logrus.WarnLevel && strings.Contains(e.Message, "from its template failed") &&
			strings.Contains(fmt.Sprint(e.Data[logrus.ErrorKey]), "build template")
	}
	if !warned {
		t.Errorf("no warning about the template build; log: %v", hook.AllEntries())
	}
	if entries, _ := os.ReadDir(state); len(entries) != 0 {
		t.Errorf("state root holds %v", entries)
	}
	left, _ := filepath.Glob(filepath.Join(cfg.Hypervisor.TemplateDir, "*"))
	for _, p := range left {
		if !strings.HasSuffix(p, ".lock") {
			t.Errorf("left behind: %s", p)
		}
	}
}

// startFailing makes a machine of mc and starts it, which must fail (its QEMU a stand-in that exits), and returns
// the machine and the start's error.
func startFailing(t *testing.T, mc Config) (*Machine, error) {
	t.Helper()
	m, err := New(mc)
	if err != nil {
		t.Fatal(err)
	}
	err = m.Start(context.Background())
	if err == nil {
		_ = m.Stop(context.Background())
		t.Fatal("Start succeeded")
	}
	return m, err
}

// quietConfig is the machine configuration of cfg for a VM "vm1" that logs nothing.
func quietConfig(t *testing.T, cfg config.Config) Config {
	t.Helper()
	log := logrus.New()
	log.SetOutput(io.Discard)
	mc, err := ConfigFrom(cfg, "vm1", logrus.NewEntry(log))
	if err != nil {
		t.Fatal(err)
	}
	return mc
}

// startableConfig is a configuration whose VM's Start gets as far as starting QEMU: empty kernel and initrd files,
// TCG, Kiln's vsock device, QEMU as root and no cgroup, and a state root of its own (returned too) with a short
// path, since the VM's Unix socket paths must fit in sun_path.
func startableConfig(t *testing.T) (config.Config, string) {
	t.Helper()
	dir := t.TempDir()
	cfg := config.Default()
	cfg.Hypervisor.Kernel, cfg.Hypervisor.Initrd = filepath.Join(dir, "vmlinuz"), filepath.Join(dir, "initrd.img")
	for _, f := range []string{cfg.Hypervisor.Kernel, cfg.Hypervisor.Initrd} {
		if err := os.WriteFile(f, nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	cfg.Hypervisor.Accelerator = config.AccelTCG
	cfg.Vsock.Mode = config.VsockVhostUser
	state, err := os.MkdirTemp("", "kq")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(state) })
	cfg.Runtime.StateDir = state
	cfg.Hypervisor.User, cfg.Hypervisor.Cgroup = "", false
	return cfg, state
}
