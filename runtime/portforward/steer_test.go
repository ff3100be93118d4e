package portforward

import (
	"errors"
	"io"
	"net"
	"syscall"
	"testing"

	"github.com/vishvananda/netlink"
)

// The program hands a connection to 127.0.0.1 or ::1 on a port where nothing listens to the listener of its
// family, whose accepted connection names the port dialled; a connection to another local address is left to the
// kernel, and detaching the program ends the steering.
func TestSteeringTakesLoopbackConnections(t *testing.T) {
	path := newNetns(t, true)
	// Another local address of the namespace, not a loopback one: the program must leave it alone.
	h := handleIn(t, path)
	lo, err := h.LinkByName("lo")
	if err != nil {
		t.Fatal(err)
	}
	other, _ := netlink.ParseAddr("192.0.2.1/32")
	if err := h.AddrAdd(lo, other); err != nil {
		t.Fatal(err)
	}

	s, err := steer(path)
	if err != nil {
		t.Fatal(err)
	}
	if s.v6 == nil {
		t.Fatal("no IPv6 listener in a namespace with ::1")
	}
	for _, tc := range []struct {
		network, addr string
		l             *net.TCPListener
		port          int
	}{
		{"tcp4", "127.0.0.1:4242", s.v4, 4242},
		{"tcp6", "[::1]:4243", s.v6, 4243},
		{"tcp4", "127.0.0.1:1", s.v4, 1},
	} {
		c, err := dialIn(path, tc.network, tc.addr)
		if err != nil {
			t.Fatalf("dial %s in the namespace: %v", tc.addr, err)
		}
		got, err := tc.l.AcceptTCP()
		if err != nil {
			t.Fatal(err)
		}
		if a := got.LocalAddr().(*net.TCPAddr); a.Port != tc.port {
			t.Errorf("dial %s: accepted with local address %s, want port %d", tc.addr, a, tc.port)
		}
		if _, err := c.Write([]byte("ping")); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 4)
		if _, err := io.ReadFull(got, buf); err != nil || string(buf) != "ping" {
			t.Errorf("dial %s: read %q, %v", tc.addr, buf, err)
		}
		c.Close()
		got.Close()
	}

	if c, err := dialIn(path, "tcp4", "192.0.2.1:4242"); !errors.Is(err, syscall.ECONNREFUSED) {
		t.Errorf("dial 192.0.2.1:4242 with the program attached: %v, want connection refused (not steered)", err)
		if c != nil {
			c.Close()
		}
	}

	s.Close()
	for _, addr := range []string{"127.0.0.1:4242", "[::1]:4243"} {
		if c, err := dialIn(path, "tcp", addr); !errors.Is(err, syscall.ECONNREFUSED) {
			t.Errorf("dial %s after Close: %v, want connection refused", addr, err)
			if c != nil {
				c.Close()
			}
		}
	}
}

// A namespace whose loopback is down (a fresh one, as `kiln check` probes) still takes the program: the listeners
// do not need their address to exist.
func TestSteeringInANamespaceWithLoopbackDown(t *testing.T) {
	path := newNetns(t, false)
	s, err := steer(path)
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
	if err := Probe(); err != nil {
		t.Errorf("Probe: %v", err)
	}
}
