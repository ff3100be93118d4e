package qemu

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/sirupsen/logrus"

	"github.com/kiln-runtime/kiln/config"
	"github.com/kiln-runtime/kiln/vm/virtiofs"
)

func TestConfigFromCarriesEveryMachineKey(t *testing.T) {
	dir := t.TempDir()
	cfg := config.Default()
	cfg.Hypervisor.Kernel, cfg.Hypervisor.Initrd = filepath.Join(dir, "vmlinuz"), filepath.Join(dir, "initrd.img")
	for _, f := range []string{cfg.Hypervisor.Kernel, cfg.Hypervisor.Initrd} {
		if err := os.WriteFile(f, nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	cfg.Hypervisor.Accelerator = config.AccelTCG
	cfg.Hypervisor.VCPUs, cfg.Hypervisor.MemoryMiB = 2, 384
	cfg.Hypervisor.KernelParams = []string{"foo=1"}
	cfg.Vsock.Mode = config.VsockVhostUser
	cfg.SharedFS.Virtiofsd, cfg.SharedFS.Cache = "/opt/virtiofsd", "always"
	cfg.Agent.Debug = true
	cfg.Runtime.StateDir = "/tmp/kiln-state"
	got, err := ConfigFrom(cfg, "vm1", logrus.NewEntry(logrus.New()))
	if err != nil {
		t.Fatal(err)
	}
	if got.ID != "vm1" || got.StateRoot != "/tmp/kiln-state" || got.Accel != "tcg" || got.VCPUs != 2 || got.MemoryMiB != 384 ||
		got.Kernel != cfg.Hypervisor.Kernel || got.Initrd != cfg.Hypervisor.Initrd || got.Vsock != VsockVhostUser ||
		got.StopTimeout != cfg.Hypervisor.StopTimeout.Std() {
		t.Errorf("machine config %+v", got)
	}
	if got.Virtiofsd.Binary != "/opt/virtiofsd" || got.Virtiofsd.Cache != virtiofs.CacheAlways {
		t.Errorf("virtiofsd config %+v, want binary /opt/virtiofsd cache always", got.Virtiofsd)
	}
	if len(got.KernelParams) != 2 || got.KernelParams[0] != "foo=1" || got.KernelParams[1] != "kiln.debug=1" {
		t.Errorf("kernel params %v", got.KernelParams)
	}
}
