package qemu

import (
	"fmt"

	"github.com/sirupsen/logrus"

	"github.com/kiln-runtime/kiln/config"
	"github.com/kiln-runtime/kiln/vm/accel"
)

// ConfigFrom turns Kiln's configuration into a machine configuration: it resolves the guest assets and decides
// the accelerator (logging a warning when it falls back to TCG).
func ConfigFrom(cfg config.Config, id string, log *logrus.Entry) (Config, error) {
	assets, err := cfg.ResolveAssets()
	if err != nil {
		return Config{}, err
	}
	choice, err := accel.DefaultHost().Detect(cfg.Hypervisor.Accelerator)
	if err != nil {
		return Config{}, err
	}
	if choice.Fallback {
		log.Warnf("accelerator: %s", choice.Reason)
	}
	if cfg.Vsock.Mode == config.VsockVhost {
		return Config{}, fmt.Errorf("vsock.mode = \"vhost\" (kernel vhost-vsock) is not implemented yet: use \"auto\" or \"vhost-user\"")
	}
	params := append([]string{}, cfg.Hypervisor.KernelParams...)
	if cfg.Agent.Debug {
		params = append(params, "kiln.debug=1")
	}
	return Config{
		ID:           id,
		StateRoot:    cfg.Runtime.StateDir,
		QEMU:         cfg.Hypervisor.Path,
		Accel:        choice.Kind,
		VCPUs:        cfg.Hypervisor.VCPUs,
		MemoryMiB:    cfg.Hypervisor.MemoryMiB,
		Kernel:       assets.Kernel,
		Initrd:       assets.Initrd,
		KernelParams: params,
		StopTimeout:  cfg.Hypervisor.StopTimeout.Std(),
		ConsoleToLog: log.Logger.IsLevelEnabled(logrus.DebugLevel),
		Log:          log,
	}, nil
}
