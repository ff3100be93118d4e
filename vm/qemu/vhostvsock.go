package qemu

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"unsafe"

	"github.com/containerd/errdefs"
	mdvsock "github.com/mdlayher/vsock"
	"golang.org/x/sys/unix"
)

// KernelVsockDevice is the host kernel's vhost-vsock device node.
const KernelVsockDevice = "/dev/vhost-vsock"

// vhostVsockSetGuestCID is VHOST_VSOCK_SET_GUEST_CID: _IOW(VHOST_VIRTIO 0xAF, 0x60, __u64).
const vhostVsockSetGuestCID = 0x4008af60

// cidAttempts bounds the search for a free guest CID; with ids drawn at random from 2^32 a collision is rare, so
// running out means something else is wrong.
const cidAttempts = 64

// kernelVsock is a vhost-vsock device opened by Kiln and handed to QEMU as vhostfd. Kiln claims the guest CID on
// its own descriptor first, so two VMs can never race for one id: the kernel refuses a CID in use (EADDRINUSE)
// and the next random one is tried.
type kernelVsock struct {
	dev *os.File
	cid uint64
}

func openKernelVsock(path string) (*kernelVsock, error) {
	dev, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w (set vsock.mode = \"vhost-user\" to use Kiln's own device)", path, err)
	}
	cid, err := allocateCID(func(cid uint64) error {
		return ioctlSetGuestCID(dev.Fd(), cid)
	}, randomCID, cidAttempts)
	if err != nil {
		dev.Close()
		return nil, fmt.Errorf("claim a guest CID on %s: %w", path, err)
	}
	return &kernelVsock{dev: dev, cid: cid}, nil
}

func ioctlSetGuestCID(fd uintptr, cid uint64) error {
	v := cid
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, fd, vhostVsockSetGuestCID, uintptr(unsafe.Pointer(&v)))
	if errno != 0 {
		return errno
	}
	return nil
}

// randomCID draws from the CIDs a guest may have: 0-2 are reserved and 0xffffffff is VMADDR_CID_ANY.
func randomCID() uint64 { return 3 + rand.Uint64N(0xffffffff-3) }

// allocateCID tries ids from pick until set accepts one; only "in use" makes it try again.
func allocateCID(set func(uint64) error, pick func() uint64, attempts int) (uint64, error) {
	for range attempts {
		cid := pick()
		err := set(cid)
		if err == nil {
			return cid, nil
		}
		if !errors.Is(err, unix.EADDRINUSE) {
			return 0, fmt.Errorf("set guest CID %d: %w", cid, err)
		}
	}
	return 0, fmt.Errorf("no free guest CID after %d attempts", attempts)
}

// qemuArgs passes the claimed device to QEMU as the child's descriptor fd.
func (k *kernelVsock) qemuArgs(fd int) []string {
	return []string{"-device", fmt.Sprintf("vhost-vsock-device,guest-cid=%d,vhostfd=%d", k.cid, fd)}
}

func (k *kernelVsock) files() []*os.File { return []*os.File{k.dev} }

// started keeps the device: Kiln's descriptor holds the guest CID for the VM's life.
func (k *kernelVsock) started() {}

func (k *kernelVsock) dial(ctx context.Context, port uint32) (net.Conn, error) {
	type result struct {
		c   net.Conn
		err error
	}
	done := make(chan result, 1)
	go func() {
		c, err := mdvsock.Dial(uint32(k.cid), port, nil)
		done <- result{c, err}
	}()
	select {
	case r := <-done:
		return r.c, r.err
	case <-ctx.Done():
		go func() {
			if r := <-done; r.c != nil {
				r.c.Close()
			}
		}()
		return nil, ctx.Err()
	}
}

// listen is not offered: a host AF_VSOCK port is one for every guest on the host, not the VM's own.
func (k *kernelVsock) listen(port uint32) (net.Listener, error) {
	return nil, fmt.Errorf("listen on host vsock port %d: the kernel's vhost-vsock shares host ports between all VMs: %w",
		port, errdefs.ErrNotImplemented)
}

func (k *kernelVsock) close() error { return k.dev.Close() }
