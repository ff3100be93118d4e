package agent

import (
	"fmt"
	"net"
	"os"
	"sync/atomic"

	"github.com/mdlayher/vsock"
	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
)

// Well-known vsock addresses as the guest sees them.
const (
	// APIPort is the vsock port the agent API is served on.
	APIPort = agentv1.APIPort
	// HostCID is the host's context id, the one a guest dials.
	HostCID = vsock.Host
)

// AnnounceReady tells the host that the agent API listens: it connects to the host's agentv1.ReadyPort and
// hangs up. A host that does not listen there polls instead, so a failure is only logged.
func AnnounceReady(log *logrus.Entry) {
	c, err := vsock.Dial(HostCID, agentv1.ReadyPort, nil)
	if err != nil {
		log.WithError(err).Debug("announce the agent API to the host")
		return
	}
	_ = c.Close()
}

// ListenVsock listens for the host's vsock connections on port, on whatever context id the guest was given;
// connections from anywhere else are closed unread (hostOnly). A buffer other than 0 is the listener's socket
// buffer (SO_VM_SOCKETS_BUFFER_SIZE), which every connection it accepts inherits. Linux's virtio transport
// advertises that buffer to the host as the connection's receive window and also caps its own send window at
// it, so it bounds the bytes in flight both ways; 0 keeps the kernel's 256 KiB.
func ListenVsock(log *logrus.Entry, port uint32, buffer uint64) (net.Listener, error) {
	f, err := vsockSocket(port, buffer)
	if err != nil {
		return nil, fmt.Errorf("listen on vsock port %d: %w", port, err)
	}
	defer f.Close()
	l, err := vsock.FileListener(f)
	if err != nil {
		return nil, fmt.Errorf("listen on vsock port %d: %w", port, err)
	}
	return &hostOnly{Listener: l, log: log.WithField("port", port)}, nil
}

// hostOnly hands on only connections from the host (CID 2). The agent's listeners take requests that run
// anything in any container of the pod; a process of the guest itself (a container's, whatever its namespaces:
// vsock has none) that reached them through a loopback transport, which the guest kernel is built without, or
// any other, is refused.
type hostOnly struct {
	net.Listener
	log *logrus.Entry
	// refused counts the connections closed for not coming from the host.
	refused atomic.Uint64
}

func (l *hostOnly) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		if a, ok := c.RemoteAddr().(*vsock.Addr); ok && a.ContextID == HostCID {
			return c, nil
		}
		_ = c.Close()
		// Logged at 1, 2, 4, 8...: a guest process that keeps trying cannot fill the console log.
		if n := l.refused.Add(1); n&(n-1) == 0 {
			l.log.WithFields(logrus.Fields{"peer": c.RemoteAddr().String(), "refused": n}).Warn("refused a vsock connection that did not come from the host")
		}
	}
}

// vsockSocket makes a listening vsock socket on port, with a socket buffer of buffer bytes unless buffer is 0.
func vsockSocket(port uint32, buffer uint64) (*os.File, error) {
	fd, err := unix.Socket(unix.AF_VSOCK, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, os.NewSyscallError("socket", err)
	}
	f := os.NewFile(uintptr(fd), fmt.Sprintf("vsock:%d", port))
	// The maximum first: the kernel clamps the size to it (256 KiB by default) without an error.
	options := []struct {
		name string
		opt  int
	}{{"SO_VM_SOCKETS_BUFFER_MAX_SIZE", unix.SO_VM_SOCKETS_BUFFER_MAX_SIZE}, {"SO_VM_SOCKETS_BUFFER_SIZE", unix.SO_VM_SOCKETS_BUFFER_SIZE}}
	if buffer == 0 {
		options = nil
	}
	for _, o := range options {
		if err := unix.SetsockoptUint64(fd, unix.AF_VSOCK, o.opt, buffer); err != nil {
			f.Close()
			return nil, fmt.Errorf("set %s to %d: %w", o.name, buffer, err)
		}
	}
	if err := unix.Bind(fd, &unix.SockaddrVM{CID: unix.VMADDR_CID_ANY, Port: port}); err != nil {
		f.Close()
		return nil, os.NewSyscallError("bind", err)
	}
	if err := unix.Listen(fd, unix.SOMAXCONN); err != nil {
		f.Close()
		return nil, os.NewSyscallError("listen", err)
	}
	return f, nil
}
