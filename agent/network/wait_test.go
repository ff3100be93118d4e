package network

import (
	"context"
	"net"
	"os"
	"runtime"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// A device bound while the agent waits is found when the kernel announces it, one already there at once, and one
// that never comes is an error once the context ends.
func TestWaitForMAC(t *testing.T) {
	h := inNewNamespace(t)
	mac := net.HardwareAddr{0x02, 0x4b, 0x69, 0x6c, 0x6e, 0x01}
	added := make(chan error, 1)
	go func() {
		time.Sleep(100 * time.Millisecond)
		added <- h.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "late0", HardwareAddr: mac}, PeerName: "late1"})
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	l, err := waitForMAC(ctx, h, mac)
	if err != nil {
		t.Fatal(err)
	}
	if err := <-added; err != nil {
		t.Fatal(err)
	}
	if l.Attrs().Name != "late0" {
		t.Errorf("waitForMAC = %s, want late0", l.Attrs().Name)
	}
	if l, err := waitForMAC(ctx, h, mac); err != nil || l.Attrs().Name != "late0" {
		t.Errorf("waitForMAC of a present device = %v, %v", l, err)
	}
	// Without the subscription (ended by a receive error), listing finds a device bound later too.
	mac2 := net.HardwareAddr{0x02, 0x4b, 0x69, 0x6c, 0x6e, 0x02}
	go func() {
		time.Sleep(50 * time.Millisecond)
		added <- h.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "late2", HardwareAddr: mac2}, PeerName: "late3"})
	}()
	if l, err := pollForMAC(ctx, h, mac2, nil); err != nil || l.Attrs().Name != "late2" {
		t.Errorf("pollForMAC = %v, %v; want late2", l, err)
	}
	if err := <-added; err != nil {
		t.Fatal(err)
	}
	short, cancelShort := context.WithTimeout(ctx, 200*time.Millisecond)
	defer cancelShort()
	if _, err := waitForMAC(short, h, net.HardwareAddr{0x02, 0, 0, 0, 0, 9}); err == nil {
		t.Error("waitForMAC found a device that never came")
	}
}

// inNewNamespace moves the test's goroutine, and its thread, into a network namespace of its own, which ends with
// the thread (never unlocked), and returns a netlink handle there, closed when the test ends; a test not run as
// root is skipped.
func inNewNamespace(t *testing.T) *netlink.Handle {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to create a network namespace")
	}
	runtime.LockOSThread()
	if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
		t.Fatal(err)
	}
	h, err := netlink.NewHandle()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(h.Close)
	return h
}
