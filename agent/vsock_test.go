package agent

import (
	"errors"
	"net"
	"testing"

	"github.com/mdlayher/vsock"
	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"
)

// TestListenVsockBuffer checks the socket a buffered listener is made from: both the buffer and its maximum
// are set (the kernel would clamp the buffer to the default maximum without an error), so that every connection
// the listener accepts inherits the window.
func TestListenVsockBuffer(t *testing.T) {
	const buffer = 1 << 20
	f, err := vsockSocket(unix.VMADDR_PORT_ANY, buffer)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, o := range []struct {
		name string
		opt  int
	}{{"SO_VM_SOCKETS_BUFFER_SIZE", unix.SO_VM_SOCKETS_BUFFER_SIZE}, {"SO_VM_SOCKETS_BUFFER_MAX_SIZE", unix.SO_VM_SOCKETS_BUFFER_MAX_SIZE}} {
		got, err := unix.GetsockoptUint64(int(f.Fd()), unix.AF_VSOCK, o.opt)
		if err != nil {
			t.Fatalf("get %s: %v", o.name, err)
		}
		if got != buffer {
			t.Errorf("%s = %d, want %d", o.name, got, buffer)
		}
	}

	for _, b := range []uint64{0, buffer} {
		l, err := ListenVsock(logrus.NewEntry(logrus.New()), unix.VMADDR_PORT_ANY, b)
		if err != nil {
			t.Fatalf("buffer %d: %v", b, err)
		}
		if a, ok := l.Addr().(*vsock.Addr); !ok || a.Port == unix.VMADDR_PORT_ANY {
			t.Errorf("buffer %d: listening on %v, want a vsock port", b, l.Addr())
		}
		l.Close()
	}
}

// A listener of the agent hands on the host's connections only: one from the guest itself (a container's process
// through a loopback transport, CID 1, or the guest's own CID) is closed unread and counted, and the listener goes
// on to the next.
func TestListenerTakesTheHostsConnectionsOnly(t *testing.T) {
	guest := &fakeConn{remote: &vsock.Addr{ContextID: 1, Port: 40000}}
	own := &fakeConn{remote: &vsock.Addr{ContextID: 3, Port: 40001}}
	other := &fakeConn{remote: &net.UnixAddr{Name: "@x", Net: "unix"}}
	host := &fakeConn{remote: &vsock.Addr{ContextID: HostCID, Port: 40002}}
	l := &hostOnly{Listener: &fakeListener{conns: []net.Conn{guest, own, other, host}}, log: logrus.NewEntry(logrus.New())}
	c, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	if c != host {
		t.Errorf("accepted %v, want the host's connection", c.RemoteAddr())
	}
	for _, f := range []*fakeConn{guest, own, other} {
		if !f.closed {
			t.Errorf("connection from %v left open", f.remote)
		}
	}
	if host.closed {
		t.Error("the host's connection was closed")
	}
	if n := l.refused.Load(); n != 3 {
		t.Errorf("refused %d, want 3", n)
	}
	if _, err := l.Accept(); !errors.Is(err, net.ErrClosed) {
		t.Errorf("Accept after the last = %v, want the listener's error", err)
	}
}

type fakeListener struct {
	net.Listener
	conns []net.Conn
}

func (l *fakeListener) Accept() (net.Conn, error) {
	if len(l.conns) == 0 {
		return nil, net.ErrClosed
	}
	c := l.conns[0]
	l.conns = l.conns[1:]
	return c, nil
}

type fakeConn struct {
	net.Conn
	remote net.Addr
	closed bool
}

func (c *fakeConn) RemoteAddr() net.Addr { return c.remote }
func (c *fakeConn) Close() error         { c.closed = true; return nil }
