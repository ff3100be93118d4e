package qemu

import (
	"context"
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
	go func() {
		select {
		case <-d.Exited():
			// virtiofsd leaves as soon as QEMU disconnects, often before QEMU has been reaped.
			select {
			case <-m.exited:
			case <-time.After(virtiofsdExitGrace):
				// The guest's shared file system hangs from now on; the VM is left to its owner to stop.
				m.log.WithError(d.ExitError()).Error("virtiofsd exited while the VM runs")
			}
		case <-m.exited:
		}
	}()
	return nil
}
