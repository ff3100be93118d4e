// Package vhostuser owns the backend side of the vhost-user protocol (QEMU docs/interop/vhost-user.rst): it
// accepts one frontend connection, negotiates features, maps the guest memory the frontend shares, builds
// virtqueues from the vring messages and starts and stops a Device when its rings are ready or stopped.
//
// It must not know what a device does with its queues (vsock, fs, ...): devices only see virtqueues.
package vhostuser

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/kiln-runtime/kiln/vm/guestmem"
	"github.com/kiln-runtime/kiln/vm/virtqueue"
)

// Device is a virtio device served over vhost-user.
type Device interface {
	// NumQueues is how many virtqueues the frontend sets up (vsock: 2, rx=0 and tx=1; the event queue stays in QEMU).
	NumQueues() int
	// Features are the device-specific virtio feature bits offered; the backend adds VIRTIO_F_VERSION_1 and
	// VHOST_USER_F_PROTOCOL_FEATURES (and may add ring features it implements, e.g. EVENT_IDX).
	Features() uint64
	// Config returns the device configuration space (answered to VHOST_USER_GET_CONFIG; for vsock: le64 guest CID).
	Config() []byte
	// Start is called once every queue has its address, kick and call fds, and is enabled.
	Start(queues []*virtqueue.Queue) error
	// Stop is called when the frontend stops the rings (GET_VRING_BASE), resets, or disconnects. It returns only
	// after the device no longer touches the queues or guest memory. Start may be called again afterwards.
	Stop()
}

// ConfigWriter is implemented by devices whose configuration space the driver may write
// (VHOST_USER_SET_CONFIG). Without it, SET_CONFIG is refused.
type ConfigWriter interface {
	// SetConfig writes data at offset of the configuration space; an error is reported to the frontend.
	SetConfig(offset uint32, data []byte) error
}

// RingFeatures are the ring feature bits the backend adds to a device's features because package virtqueue
// implements them.
const RingFeatures = FeatureRingIndirectDesc | FeatureRingEventIdx

// GuestRAM bounds the guest memory a device maps and reaches.
type GuestRAM struct {
	// Bytes is the most memory the VM has (QEMU's maxmem): a memory table whose regions hold more is refused, so
	// that a front end cannot have this process map, and fault in, more than the VM's memory. 0: no bound.
	Bytes uint64
	// Grant bounds the part of the RAM the device's queues may reach (guestmem.Grant); nil, all of it.
	Grant *guestmem.Grant
}

// Serve accepts exactly one frontend connection on l and serves dev until the frontend disconnects or ctx is
// done. It returns nil on an orderly disconnect and ctx's error when ctx ends the session. The device is
// stopped and guest memory unmapped before Serve returns. l stays open; it belongs to the caller. ram bounds the
// guest memory the device maps and reaches.
func Serve(ctx context.Context, l *net.UnixListener, dev Device, ram GuestRAM, log *logrus.Entry) error {
	if log == nil {
		discard := logrus.New()
		discard.SetOutput(io.Discard)
		log = logrus.NewEntry(discard)
	}
	if n := dev.NumQueues(); n <= 0 || n > int(vringIndexMask)+1 {
		return fmt.Errorf("serve vhost-user: device has %d queues", n)
	}
	// Deadlines in the past unblock Accept and Read when ctx ends, without closing what the caller owns.
	past := time.Unix(1, 0)
	stopAccept := context.AfterFunc(ctx, func() { l.SetDeadline(past) })
	conn, err := l.AcceptUnix()
	stopAccept()
	if err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		return fmt.Errorf("accept vhost-user frontend on %s: %w", l.Addr(), err)
	}
	defer conn.Close()
	stopRead := context.AfterFunc(ctx, func() { conn.SetDeadline(past) })
	defer stopRead()

	s := newSession(dev, ram, conn, log)
	defer s.close()
	log.Debug("vhost-user frontend connected")
	for {
		m, err := readMessage(conn)
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if errors.Is(err, io.EOF) {
				log.Debug("vhost-user frontend disconnected")
				return nil
			}
			return fmt.Errorf("serve vhost-user on %s: %w", l.Addr(), err)
		}
		err = s.handle(m)
		m.closeFDs()
		if err != nil {
			return fmt.Errorf("serve vhost-user on %s: %w", l.Addr(), err)
		}
	}
}
