package network

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/kiln-runtime/kiln/netns"
)

// listenInPod listens on addr inside the pod namespace.
func listenInPod(t *testing.T, path, network, addr string) net.Listener {
	t.Helper()
	var l net.Listener
	err := netns.DoPath(path, func() error {
		var err error
		l, err = net.Listen(network, addr)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return l
}

// DialLoopback reaches a port of the pod namespace, over IPv6 when nothing listens on 127.0.0.1, and never the
// agent's own namespace.
func TestDialLoopback(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to create network namespaces")
	}
	p := New(filepath.Join(t.TempDir(), "pod"), logrus.NewEntry(logrus.StandardLogger()))
	ctx := context.Background()
	if _, err := p.DialLoopback(ctx, 80); err == nil || !strings.Contains(err.Error(), "no network namespace") {
		t.Errorf("dial before the namespace exists: %v", err)
	}
	path, err := p.Path()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = unix.Unmount(path, unix.MNT_DETACH) })

	// A port open in the test's own namespace only is not the pod's.
	outside, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer outside.Close()
	outsidePort := uint16(outside.Addr().(*net.TCPAddr).Port)
	if c, err := p.DialLoopback(ctx, outsidePort); err == nil {
		c.Close()
		t.Errorf("port %d of the agent's namespace reached through the pod's", outsidePort)
	}

	for _, tc := range []struct{ network, addr string }{
		{"tcp4", "127.0.0.1:0"},
		{"tcp6", "[::1]:0"},
	} {
		l := listenInPod(t, path, tc.network, tc.addr)
		port := uint16(l.Addr().(*net.TCPAddr).Port)
		accepted := make(chan net.Conn, 1)
		go func() {
			c, _ := l.Accept()
			accepted <- c
		}()
		c, err := p.DialLoopback(ctx, port)
		if err != nil {
			t.Fatalf("%s: %v", tc.network, err)
		}
		s := <-accepted
		if s == nil {
			t.Fatalf("%s: nothing accepted", tc.network)
		}
		fmt.Fprint(c, "hi")
		c.Close()
		if b, err := io.ReadAll(s); err != nil || string(b) != "hi" {
			t.Errorf("%s: read %q, %v", tc.network, b, err)
		}
		s.Close()
	}
}
