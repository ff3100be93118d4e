package qemu

import (
	"context"
	"fmt"
	"time"

	"github.com/kiln-runtime/kiln/vm/virtiofs"
)

// virtiofsdExitGrace is how long after virtiofsd's exit QEMU may take to exit too before virtiofsd's exit counts
// as a failure of a running VM.
const virtiofsdExitGrace = 2 * time.Second

// startVirtiofsd runs the virtio-fs backend for Config.SharedDir, before QEMU, which connects to it at start.
// The caller holds m.mu; cleanup stops the daemon.
func (m *Machine) startVirtiofsd(ctx context.Context) error {
	cfg := m.cfg.Virtiofsd
	cfg.SourceDir = m.cfg.SharedDir
	cfg.SocketPath = m.paths.virtiofs
	cfg.Log = m.log
	cfg.Cgroup = m.cgroup
	d, err := virtiofs.Start(ctx, cfg)
	if err != nil {
		return err
	}
	m.fs = d
	if m.cfg.Hold != nil {
		m.cfg.Hold(d)
	}
	// The channel is this start's: a start from a template that failed is followed by a boot with new ones.
	go m.watchVirtiofsd(d, m.exited)
	return nil
}

// watchVirtiofsd ends the VM when virtiofsd dies under it: the guest's root file systems are served by it, so
// a guest without it has containers that hang on every file access, and QEMU 7.2 neither notices nor
// reconnects. The death counts as the VM's: QEMU is killed, and ExitError names virtiofsd as the cause.
func (m *Machine) watchVirtiofsd(d *virtiofs.Daemon, exited <-chan struct{}) {
	select {
	case <-d.Exited():
	case <-exited:
		return
	}
	// virtiofsd leaves as soon as QEMU disconnects, often before QEMU has been reaped.
	select {
	case <-exited:
		return
	case <-time.After(virtiofsdExitGrace):
	}
	err := fmt.Errorf("virtiofsd exited while the VM ran, taking the guest's shared file system with it: %w", d.ExitError())
	// Start holds mu until QEMU runs or has failed, so proc is settled here. A start from a template that failed
	// meanwhile was followed, under mu, by a boot with a virtiofsd of its own: that VM is not this watcher's.
	m.mu.Lock()
	if m.fs != d {
		m.mu.Unlock()
		return
	}
	m.fsErr = err
	proc := m.proc
	m.mu.Unlock()
	m.log.WithError(err).Error("stopping the VM")
	if proc != nil {
		proc.Kill()
	}
}
