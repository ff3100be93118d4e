package qemu

import (
	"fmt"
	"os"
	"syscall"

	"github.com/sirupsen/logrus"

	"github.com/kiln-runtime/kiln/config"
	"github.com/kiln-runtime/kiln/vm/accel"
	"github.com/kiln-runtime/kiln/vm/virtiofs"
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
	mode, err := ResolveVsockMode(cfg.Vsock.Mode)
	if err != nil {
		return Config{}, err
	}
	var user *syscall.Credential
	if u, ok, err := cfg.Hypervisor.ResolveUser(); err != nil {
		return Config{}, err
	} else if ok {
		user = &syscall.Credential{Uid: u.UID, Gid: u.GID}
		if os.Geteuid() != 0 {
			// Only root can switch; an unprivileged Kiln runs QEMU as itself.
			log.Debugf("hypervisor.user %q ignored: Kiln is not root", cfg.Hypervisor.User)
			user = nil
		}
	}
	params := append([]string{}, cfg.Hypervisor.KernelParams...)
	if cfg.Agent.Debug {
		params = append(params, "kiln.debug=1")
	}
	var templateDir string
	if cfg.Hypervisor.FastStart == config.FastStartTemplate {
		templateDir = cfg.Hypervisor.TemplateDir
	}
	return Config{
		ID:                id,
		StateRoot:         cfg.Runtime.StateDir,
		QEMU:              cfg.Hypervisor.Path,
		Accel:             choice.Kind,
		VCPUs:             cfg.Hypervisor.VCPUs,
		MemoryMiB:         cfg.Hypervisor.MemoryMiB,
		Kernel:            assets.Kernel,
		Initrd:            assets.Initrd,
		AgentImage:        assets.AgentImage,
		KernelParams:      params,
		StopTimeout:       cfg.Hypervisor.StopTimeout.Std(),
		TBSizeMiB:         cfg.Hypervisor.TCGTranslationCacheMiB,
		FreePageReporting: cfg.Hypervisor.FreePageReporting,
		Vsock:             mode,
		Virtiofsd:         virtiofs.Config{Binary: cfg.SharedFS.Virtiofsd, Cache: virtiofs.Cache(cfg.SharedFS.Cache)},
		ConsoleToLog:      log.Logger.IsLevelEnabled(logrus.DebugLevel),
		User:              user,
		Cgroup:            cfg.Hypervisor.Cgroup,
		MemoryOverheadMiB: cfg.Hypervisor.MemoryOverheadMiB,
		TemplateDir:       templateDir,
		TemplateMax:       cfg.Hypervisor.TemplateMax,
		Log:               log,
		resolvedAssets:    assets,
	}, nil
}

// ResolveVsockMode turns vsock.mode into a device. "auto" is Kiln's own vhost-user device: through it the guest
// reaches only the ports Kiln serves for it. The kernel's vhost-vsock ("vhost", chosen explicitly and only where
// /dev/vhost-vsock opens) is faster, but gives the guest every AF_VSOCK listener of the host: Linux's host side
// lets a guest connect to any port listening on the host's CID, not only the shim's.
func ResolveVsockMode(mode string) (VsockMode, error) {
	return resolveVsockMode(mode, kernelVsockUsable)
}

func resolveVsockMode(mode string, kernelUsable func() error) (VsockMode, error) {
	switch mode {
	case config.VsockVhostUser, config.VsockAuto, "":
		return VsockVhostUser, nil
	case config.VsockVhost:
		if err := kernelUsable(); err != nil {
			return "", fmt.Errorf("vsock.mode = \"vhost\": %w; use \"auto\" or \"vhost-user\"", err)
		}
		return VsockKernel, nil
	default:
		return "", fmt.Errorf("vsock.mode = %q: want \"auto\", \"vhost-user\" or \"vhost\"", mode)
	}
}

func kernelVsockUsable() error {
	f, err := os.OpenFile(KernelVsockDevice, os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("cannot open %s: %w", KernelVsockDevice, err)
	}
	return f.Close()
}
