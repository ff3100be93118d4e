package agent

import (
	"testing"

	"github.com/mdlayher/vsock"
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
		l, err := ListenVsock(unix.VMADDR_PORT_ANY, b)
		if err != nil {
			t.Fatalf("buffer %d: %v", b, err)
		}
		if a, ok := l.Addr().(*vsock.Addr); !ok || a.Port == unix.VMADDR_PORT_ANY {
			t.Errorf("buffer %d: listening on %v, want a vsock port", b, l.Addr())
		}
		l.Close()
	}
}
