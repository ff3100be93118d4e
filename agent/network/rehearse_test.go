package network

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
)

// A rehearsal configures its interfaces in a namespace of its own and deletes it, leaving the pod's namespace
// alone; one that fails deletes it too; once the pod's network is configured, a rehearsal is refused.
func TestRehearseNetwork(t *testing.T) {
	// The test's namespace plays the guest's root namespace.
	h := inNewNamespace(t)
	path := filepath.Join(t.TempDir(), "pod")
	t.Cleanup(func() {
		_ = unix.Unmount(path, unix.MNT_DETACH)
		_ = unix.Unmount(path+".rehearsal", unix.MNT_DETACH)
	})
	p := New(path, logrus.NewEntry(logrus.StandardLogger()))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	mac := net.HardwareAddr{0x02, 0x4b, 0x69, 0x6c, 0x6e, 0x11}
	if err := h.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "rh0", HardwareAddr: mac}, PeerName: "rh1"}); err != nil {
		t.Fatal(err)
	}
	req := &agentv1.ConfigureNetworkRequest{
		Interfaces: []*agentv1.Interface{{Name: "eth0", Mac: mac.String(), Mtu: 1400, Addresses: []string{"192.0.2.2/24", "fd00:db8::2/64"}}},
		Routes: []*agentv1.Route{
			{Gateway: "192.0.2.1", Device: "eth0", Family: 4},
			{Gateway: "fd00:db8::1", Device: "eth0", Family: 6},
		},
		Neighbours: []*agentv1.Neighbour{{Device: "eth0", Ip: "192.0.2.1", Mac: "02:4b:69:6c:6e:12"}},
	}
	if _, err := p.RehearseNetwork(ctx, req); err != nil {
		t.Fatalf("RehearseNetwork: %v", err)
	}
	if _, err := os.Lstat(path + ".rehearsal"); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the rehearsal's namespace file is still there: %v", err)
	}
	if _, err := os.Lstat(path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the rehearsal made the pod's namespace: %v", err)
	}
	// The kernel deletes a veth whose namespace it deletes, and its peer with it: rh1 going is the rehearsal's
	// namespace really gone, not held by anything the rehearsal left open.
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := h.LinkByName("rh1"); err != nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the rehearsal's namespace was not deleted: rh1, its device's peer, is still there 10s later")
		}
		time.Sleep(10 * time.Millisecond)
	}

	// A rehearsal whose device never comes fails, and deletes its namespace all the same.
	short, cancelShort := context.WithTimeout(ctx, 200*time.Millisecond)
	defer cancelShort()
	absent := &agentv1.ConfigureNetworkRequest{Interfaces: []*agentv1.Interface{{Name: "eth0", Mac: "02:00:00:00:00:09"}}}
	if _, err := p.RehearseNetwork(short, absent); err == nil || !strings.Contains(err.Error(), "rehearse network") {
		t.Errorf("RehearseNetwork of a device that never comes = %v, want its error", err)
	}
	if _, err := os.Lstat(path + ".rehearsal"); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a failed rehearsal left its namespace file: %v", err)
	}

	mac2 := net.HardwareAddr{0x02, 0x4b, 0x69, 0x6c, 0x6e, 0x13}
	if err := h.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "rh2", HardwareAddr: mac2}, PeerName: "rh3"}); err != nil {
		t.Fatal(err)
	}
	req.Interfaces[0].Mac = mac2.String()
	if _, err := p.ConfigureNetwork(ctx, req); err != nil {
		t.Fatalf("ConfigureNetwork after rehearsals: %v", err)
	}
	if _, err := p.RehearseNetwork(ctx, req); err == nil || !strings.Contains(err.Error(), "configured already") {
		t.Errorf("RehearseNetwork after ConfigureNetwork = %v, want a refusal", err)
	}
}
