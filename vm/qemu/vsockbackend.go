package qemu

import (
	"context"
	"fmt"
	"net"
	"os"

	"github.com/containerd/errdefs"
	"github.com/sirupsen/logrus"

	"github.com/kiln-runtime/kiln/vm/vhostuser"
	"github.com/kiln-runtime/kiln/vm/vsock"
)

// VsockMode selects how the host reaches the guest's vsock.
type VsockMode string

// Vsock modes.
const (
	// VsockVhostUser is Kiln's own device backend, served in-process over vhost-user; guest connections to host
	// port P go to the Unix socket VsockPath()+"_P". It needs nothing from the host kernel.
	VsockVhostUser VsockMode = "vhost-user"
	// VsockKernel is the host kernel's vhost-vsock (/dev/vhost-vsock) with a CID Kiln claims for the VM; guest
	// connections to host port P go to host AF_VSOCK listeners.
	VsockKernel VsockMode = "vhost"
)

// vsockBackend is one way of giving the guest a vsock device.
type vsockBackend interface {
	// qemuArgs are the device's QEMU arguments; firstFD is the child's number for the first of files().
	qemuArgs(firstFD int) []string
	// files are handed to QEMU as inherited descriptors.
	files() []*os.File
	// started is called once QEMU runs (or failed to), so the backend can drop what only QEMU needs.
	started()
	dial(ctx context.Context, port uint32) (net.Conn, error)
	// listen accepts the guest's connections to host port port.
	listen(port uint32) (net.Listener, error)
	close() error
}

// guestCID is the guest's vsock context id with the vhost-user device: each VM has its own device, so ids never
// collide.
const guestCID = 3

// vhostUserVsock is Kiln's in-process vsock device, served to QEMU over a vhost-user socket.
type vhostUserVsock struct {
	dev        *vsock.Device
	socketPath string
	udsPath    string
	log        *logrus.Entry
	// qemuEnd is Kiln's own connection to its backend socket, handed to QEMU, which then needs no access to
	// the socket's path; nil until connectQEMU.
	qemuEnd *os.File
}

// guestRAM bounds the guest memory the vhost-user back end maps (QEMU's maxmem) and reaches (the VM's grant).
func (m *Machine) guestRAM() vhostuser.GuestRAM {
	return vhostuser.GuestRAM{Bytes: uint64(m.cfg.maxMiB()) << 20, Grant: m.grant}
}

// startVhostUserVsock creates the device and serves QEMU's connection until ctx ends. The backend insists on guest
// RAM that cannot shrink under its mapping: QEMU's sealed memfd, or a clone's sealed copy of its template's RAM.
// ram bounds the memory the device maps and reaches.
func startVhostUserVsock(ctx context.Context, socketPath, udsPath string, ram vhostuser.GuestRAM, log *logrus.Entry) (*vhostUserVsock, error) {
	dev, err := vsock.New(vsock.Config{GuestCID: guestCID, UDSPath: udsPath}, log)
	if err != nil {
		return nil, fmt.Errorf("vsock device: %w", err)
	}
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: socketPath, Net: "unix"})
	if err != nil {
		dev.Close()
		return nil, fmt.Errorf("listen for QEMU's vhost-user vsock connection: %w", err)
	}
	go func() {
		defer l.Close()
		if err := vhostuser.Serve(ctx, l, dev, ram, log.WithField("device", "vsock")); err != nil && ctx.Err() == nil {
			log.WithError(err).Warn("vhost-user vsock backend stopped")
		}
	}()
	v := &vhostUserVsock{dev: dev, socketPath: socketPath, udsPath: udsPath, log: log}
	if err := v.connectQEMU(); err != nil {
		dev.Close()
		return nil, err
	}
	return v, nil
}

func (v *vhostUserVsock) qemuArgs(fd int) []string {
	return []string{
		"-chardev", fmt.Sprintf("socket,id=vsock,fd=%d", fd),
		"-device", "vhost-user-vsock-device,chardev=vsock",
	}
}

// connectQEMU connects to the backend's socket; QEMU inherits the connection (files) as its vhost-user
// chardev.
func (v *vhostUserVsock) connectQEMU() error {
	c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: v.socketPath, Net: "unix"})
	if err != nil {
		return fmt.Errorf("connect to the vhost-user vsock socket for QEMU: %w", err)
	}
	f, err := c.File()
	c.Close()
	if err != nil {
		return fmt.Errorf("vhost-user vsock connection for QEMU: %w", err)
	}
	v.qemuEnd = f
	return nil
}

func (v *vhostUserVsock) files() []*os.File {
	if v.qemuEnd == nil {
		return nil
	}
	return []*os.File{v.qemuEnd}
}

// started drops Kiln's copy of QEMU's connection once QEMU holds it, so QEMU's exit ends the session.
func (v *vhostUserVsock) started() {
	if v.qemuEnd != nil {
		v.qemuEnd.Close()
		v.qemuEnd = nil
	}
}

func (v *vhostUserVsock) dial(ctx context.Context, port uint32) (net.Conn, error) {
	return vsock.Dial(ctx, v.udsPath, port)
}

func (v *vhostUserVsock) traffic() vsock.Traffic { return v.dev.Traffic() }

// listen listens where the device connects the guest's connections to port (the hybrid vsock convention); the
// listener removes its socket when closed.
func (v *vhostUserVsock) listen(port uint32) (net.Listener, error) {
	return net.Listen("unix", fmt.Sprintf("%s_%d", v.udsPath, port))
}

// close ends the device and reports what it dropped or cut short over the VM's life, if anything, so a limit
// the guest ran into shows in the shim's log once.
func (v *vhostUserVsock) close() error {
	v.started()
	err := v.dev.Close()
	if mt := v.dev.Metrics(); mt != (vsock.Metrics{}) {
		v.log.WithFields(logrus.Fields{
			"rst_dropped": mt.RstDropped, "malformed_tx_chains": mt.MalformedTxChains,
			"malformed_rx_chains": mt.MalformedRxChains, "small_rx_chains": mt.SmallRxChains,
			"conns_killed": mt.ConnsKilled, "conns_violated": mt.ConnsViolated, "warnings_suppressed": mt.WarningsSuppressed,
		}).Info("vsock device counters")
	}
	return err
}

// noVsock is a template's vsock: none, since a vhost-user device would keep QEMU from saving the guest.
type noVsock struct{}

func (noVsock) qemuArgs(int) []string { return nil }
func (noVsock) files() []*os.File     { return nil }
func (noVsock) started()              {}
func (noVsock) close() error          { return nil }
func (noVsock) dial(context.Context, uint32) (net.Conn, error) {
	return nil, fmt.Errorf("a template guest has no vsock device")
}
func (noVsock) listen(uint32) (net.Listener, error) {
	return nil, fmt.Errorf("a template guest has no vsock device: %w", errdefs.ErrNotImplemented)
}
