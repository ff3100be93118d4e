package task

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/sirupsen/logrus"

	"github.com/kiln-runtime/kiln/config"
	"github.com/kiln-runtime/kiln/runtime/container"
	"github.com/kiln-runtime/kiln/runtime/sandbox"
	"github.com/kiln-runtime/kiln/runtime/share"
	"github.com/kiln-runtime/kiln/vm/qemu"
)

// vmSandbox is one shim's microVM: the VM with its agent, the shared directory it exports, and the handles on
// its containers.
type vmSandbox struct {
	id       string
	cfg      config.Config
	shareDir string
	share    *share.Share
	sb       *sandbox.Sandbox
	mgr      *container.Manager
	log      *logrus.Entry
}

// VMID is the id of the VM that serves a shim group: short, because QEMU's sockets live under
// <state>/<vm id>/ and Unix socket paths are limited to 108 bytes; derived from namespace and group, so it is
// the same for every container of the group.
func VMID(namespace, group string) string {
	sum := sha256.Sum256([]byte(namespace + "/" + group))
	return "kiln-" + hex.EncodeToString(sum[:8])
}

// ShareDir is where a VM's shared directory lives: beside its state directory, not inside it, because QEMU
// removes its state directory recursively and a share holds bind mounts of containers' files.
func ShareDir(stateDir, vmID string) string { return filepath.Join(stateDir, vmID+".share") }

// bootSandbox creates the share, boots the VM exporting it, and starts following its containers. On error
// nothing is left behind.
func bootSandbox(ctx context.Context, cfg config.Config, vmID, version string, log *logrus.Entry, onEvent func(container.Event)) (_ *vmSandbox, retErr error) {
	log = log.WithField("sandbox", vmID)
	v := &vmSandbox{id: vmID, cfg: cfg, shareDir: ShareDir(cfg.Runtime.StateDir, vmID), log: log}
	if err := os.MkdirAll(cfg.Runtime.StateDir, 0o711); err != nil {
		return nil, fmt.Errorf("create state dir %s: %w", cfg.Runtime.StateDir, err)
	}
	if _, err := qemu.Sweep(cfg.Runtime.StateDir); err != nil {
		log.WithError(err).Warn("sweep state of VMs whose owner is gone")
	}
	// A share left by a shim of the same group that crashed is in the way; its VM is gone with that shim.
	if err := share.Remove(v.shareDir); err != nil {
		return nil, fmt.Errorf("remove stale share of sandbox %s: %w", vmID, err)
	}
	sh, err := share.New(v.shareDir)
	if err != nil {
		return nil, fmt.Errorf("boot sandbox %s: %w", vmID, err)
	}
	v.share = sh
	defer func() {
		if retErr != nil {
			if err := sh.Close(); err != nil {
				log.WithError(err).Warn("remove share after a failed boot")
			}
		}
	}()
	qcfg, err := qemu.ConfigFrom(cfg, vmID, log)
	if err != nil {
		return nil, fmt.Errorf("boot sandbox %s: %w", vmID, err)
	}
	qcfg.SharedDir = sh.ExportDir()
	m, err := qemu.New(qcfg)
	if err != nil {
		return nil, fmt.Errorf("boot sandbox %s: %w", vmID, err)
	}
	sb, err := sandbox.Start(ctx, m, sandbox.OptionsFrom(cfg, version, log))
	if err != nil {
		return nil, fmt.Errorf("boot sandbox %s: %w", vmID, err)
	}
	v.sb = sb
	// The Events stream never goes idle; on a connection of its own, Stop can cut it before asking the agent to
	// shut down instead of waiting out the agent's drain timeout.
	events, err := sb.StreamClient(ctx)
	if err != nil {
		_ = sb.Stop(context.WithoutCancel(ctx))
		return nil, fmt.Errorf("boot sandbox %s: %w", vmID, err)
	}
	v.mgr = container.NewManager(sb.Containers(), m, container.Options{
		RequestTimeout: cfg.Agent.RequestTimeout.Std(),
		Events:         events,
		OnEvent:        onEvent,
		Log:            log,
	})
	return v, nil
}

// stop ends the VM and removes the share. Containers still in the guest die with it.
func (v *vmSandbox) stop(ctx context.Context) error {
	var errs []error
	if v.mgr != nil {
		_ = v.mgr.Close()
	}
	if v.sb != nil {
		if err := v.sb.Stop(ctx); err != nil {
			errs = append(errs, err)
		}
	}
	if v.share != nil {
		if err := v.share.Close(); err != nil {
			errs = append(errs, err)
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("stop sandbox %s: %w", v.id, errors.Join(errs...))
	}
	return nil
}
