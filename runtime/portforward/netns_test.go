package portforward

import (
	"fmt"
	"net"
	"os"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	knetns "github.com/kiln-runtime/kiln/netns"
)

// newNetns makes a network namespace, with its loopback up when up is set, and returns a path to it valid until
// the test ends.
func newNetns(t *testing.T, up bool) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: network namespaces and BPF")
	}
	f, err := newNamespace()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	path := fmt.Sprintf("/proc/self/fd/%d", f.Fd())
	if up {
		h := handleIn(t, path)
		lo, err := h.LinkByName("lo")
		if err == nil {
			err = h.LinkSetUp(lo)
		}
		if err != nil {
			t.Fatalf("bring lo up: %v", err)
		}
	}
	return path
}

// handleIn is a netlink handle working in the namespace at path, closed when the test ends.
func handleIn(t *testing.T, path string) *netlink.Handle {
	t.Helper()
	ns, err := netns.GetFromPath(path)
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(h.Close)
	return h
}

// dialIn dials addr from inside the namespace at path.
func dialIn(path, network, addr string) (c net.Conn, err error) {
	nerr := knetns.DoPath(path, func() error {
		c, err = net.Dial(network, addr)
		return nil
	})
	if nerr != nil {
		return nil, nerr
	}
	return c, err
}

// listenInNS listens on addr from inside the namespace at path.
func listenInNS(path, network, addr string) (l net.Listener, err error) {
	nerr := knetns.DoPath(path, func() error {
		l, err = net.Listen(network, addr)
		return nil
	})
	if nerr != nil {
		return nil, nerr
	}
	return l, err
}
