package network

import (
	"context"
	"fmt"
	"maps"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	logtest "github.com/sirupsen/logrus/hooks/test"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
)

// Prepare makes the pod namespace, loopback up, without anyone asking for its path; calling it again makes no
// second one.
func TestPrepare(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to create network namespaces")
	}
	path := filepath.Join(t.TempDir(), "pod")
	p := New(path, logrus.NewEntry(logrus.StandardLogger()))
	p.Prepare()
	p.Prepare()
	t.Cleanup(func() { _ = unix.Unmount(path, unix.MNT_DETACH) })
	deadline := time.Now().Add(10 * time.Second)
	for !isNamespace(path) {
		if time.Now().After(deadline) {
			t.Fatalf("no network namespace bound on %s 10s after Prepare", path)
		}
		time.Sleep(10 * time.Millisecond)
	}
	got, err := p.Path()
	if err != nil || got != path {
		t.Fatalf("Path after Prepare: %q, %v; want %q", got, err, path)
	}
	h, err := p.handle()
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	lo, err := h.LinkByName("lo")
	if err != nil {
		t.Fatal(err)
	}
	if lo.Attrs().Flags&unix.IFF_UP == 0 {
		t.Errorf("lo in the prepared namespace is down: %v", lo.Attrs().Flags)
	}
	links, err := h.LinkList()
	if err != nil {
		t.Fatal(err)
	}
	if len(links) != 1 {
		t.Errorf("the prepared namespace has links %v, want lo alone", linkNames(links))
	}
}

// A namespace Prepare cannot make is logged, and Path meets the same error again rather than a half-made
// namespace.
func TestPrepareFailureLeftToPath(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to create network namespaces")
	}
	// A directory that cannot be made: its parent is a file.
	parent := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(parent, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	logger, logged := logtest.NewNullLogger()
	p := New(filepath.Join(parent, "netns", "pod"), logrus.NewEntry(logger))
	p.Prepare()
	deadline := time.Now().Add(10 * time.Second)
	for !warned(logged, "prepare the pod network namespace") {
		if time.Now().After(deadline) {
			t.Fatalf("no warning 10s after a Prepare that cannot succeed")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if _, err := p.Path(); err == nil || !strings.Contains(err.Error(), "create pod network namespace") {
		t.Errorf("Path after a failed Prepare: %v, want the creation's error", err)
	}
}

func warned(h *logtest.Hook, msg string) bool {
	for _, e := range h.AllEntries() {
		if e.Level == logrus.WarnLevel && e.Message == msg {
			return true
		}
	}
	return false
}

func isNamespace(path string) bool {
	var st unix.Statfs_t
	return unix.Statfs(path, &st) == nil && st.Type == unix.NSFS_MAGIC
}

func linkNames(links []netlink.Link) []string {
	names := make([]string, 0, len(links))
	for _, l := range links {
		names = append(names, l.Attrs().Name)
	}
	return names
}

// podNetwork is the Network service of a pod namespace under the test's temporary directory, with the test in a
// namespace of its own as the guest's root (h), and a context that ends within 10 s.
func podNetwork(t *testing.T) (*netlink.Handle, *Pod, context.Context) {
	t.Helper()
	h := inNewNamespace(t)
	path := filepath.Join(t.TempDir(), "pod")
	t.Cleanup(func() { _ = unix.Unmount(path, unix.MNT_DETACH) })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return h, New(path, logrus.NewEntry(logrus.StandardLogger())), ctx
}

// Each device ends with the name it wants, whether the guest already called it so (it moves as it is) or another
// device held that name (two that swap names move under temporary ones first).
func TestConfigureNetworkNames(t *testing.T) {
	h, p, ctx := podNetwork(t)
	devices := []struct{ guest, want string }{{"eth0", "eth0"}, {"other", "net1"}, {"swp0", "swp1"}, {"swp1", "swp0"}}
	req := &agentv1.ConfigureNetworkRequest{}
	macs := map[string]string{}
	for i, d := range devices {
		mac := net.HardwareAddr{0x02, 0x4b, 0x69, 0x6c, 0x6e, byte(0x20 + i)}
		if err := h.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: d.guest, HardwareAddr: mac}, PeerName: fmt.Sprintf("peer%d", i)}); err != nil {
			t.Fatal(err)
		}
		req.Interfaces = append(req.Interfaces, &agentv1.Interface{Name: d.want, Mac: mac.String(), Addresses: []string{fmt.Sprintf("192.0.2.%d/32", 10+i)}})
		macs[d.want] = mac.String()
	}
	// Every name each device had in this (the guest's root) namespace, renames included, until a fence device
	// that comes after ConfigureNetwork's changes.
	const fence = "fence"
	updates, done := make(chan netlink.LinkUpdate, 64), make(chan struct{})
	if err := netlink.LinkSubscribe(updates, done); err != nil {
		t.Fatal(err)
	}
	names := map[int][]string{}
	fenced := make(chan struct{})
	go func() {
		defer close(fenced)
		for u := range updates {
			if u.Header.Type != unix.RTM_NEWLINK {
				continue
			}
			if u.Attrs().Name == fence {
				return
			}
			names[int(u.Index)] = append(names[int(u.Index)], u.Attrs().Name)
		}
	}()
	indexes := map[string]int{}
	for _, d := range devices {
		l, err := h.LinkByName(d.guest)
		if err != nil {
			t.Fatal(err)
		}
		indexes[d.want] = l.Attrs().Index
	}
	if _, err := p.ConfigureNetwork(ctx, req); err != nil {
		t.Fatalf("ConfigureNetwork: %v", err)
	}
	if err := h.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: fence}, PeerName: fence + "-peer"}); err != nil {
		t.Fatal(err)
	}
	select {
	case <-fenced:
	case <-ctx.Done():
		t.Fatal("the fence device's link update did not come")
	}
	close(done)
	go func() {
		for range updates {
		}
	}()
	for name, renamed := range map[string]bool{"eth0": false, "net1": true} {
		tmp := slices.ContainsFunc(names[indexes[name]], func(n string) bool { return strings.HasPrefix(n, "kiln") })
		if tmp != renamed {
			t.Errorf("device that became %s had names %v in the root namespace: renamed to a temporary name %v, want %v", name, names[indexes[name]], tmp, renamed)
		}
	}
	ph, err := p.handle()
	if err != nil {
		t.Fatal(err)
	}
	defer ph.Close()
	links, err := ph.LinkList()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]string{}
	for _, l := range links {
		if l.Attrs().Name != "lo" {
			got[l.Attrs().Name] = l.Attrs().HardwareAddr.String()
		}
	}
	if !maps.Equal(got, macs) {
		t.Errorf("pod namespace devices (name: MAC) %v, want %v", got, macs)
	}
}

// Routes through a gateway that only a link route reaches (Calico's and the AWS VPC CNI's 169.254.1.1 beside a
// /32 address) and routes marked onlink are set up in the pod namespace as the host's namespace had them.
func TestConfigureNetworkGatewayOnTheLink(t *testing.T) {
	h, p, ctx := podNetwork(t)
	mac := net.HardwareAddr{0x02, 0x4b, 0x69, 0x6c, 0x6e, 0x31}
	if err := h.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "eth0", HardwareAddr: mac}, PeerName: "peer0"}); err != nil {
		t.Fatal(err)
	}
	req := &agentv1.ConfigureNetworkRequest{
		Interfaces: []*agentv1.Interface{{Name: "eth0", Mac: mac.String(), Addresses: []string{"10.99.0.5/32"}}},
		// In the order a host's namespace lists them: by destination, the default first.
		Routes: []*agentv1.Route{
			{Gateway: "169.254.1.1", Device: "eth0", Family: 4},
			{Destination: "10.97.0.0/16", Gateway: "10.50.0.1", Device: "eth0", Family: 4, Onlink: true},
			{Destination: "169.254.1.1/32", Device: "eth0", Family: 4, Scope: uint32(netlink.SCOPE_LINK)},
		},
	}
	if _, err := p.ConfigureNetwork(ctx, req); err != nil {
		t.Fatalf("ConfigureNetwork: %v", err)
	}
	ph, err := p.handle()
	if err != nil {
		t.Fatal(err)
	}
	defer ph.Close()
	routes, err := ph.RouteList(nil, netlink.FAMILY_V4)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, r := range routes {
		got = append(got, r.String())
	}
	has := func(dst, gw string, onlink bool) bool {
		return slices.ContainsFunc(routes, func(r netlink.Route) bool {
			d := "default"
			if r.Dst != nil && !r.Dst.IP.IsUnspecified() {
				d = r.Dst.String()
			}
			return d == dst && r.Gw.String() == gw && (r.Flags&int(netlink.FLAG_ONLINK) != 0) == onlink
		})
	}
	if !has("default", "169.254.1.1", false) || !has("10.97.0.0/16", "10.50.0.1", true) {
		t.Errorf("pod namespace routes %q lack the default via 169.254.1.1 or 10.97.0.0/16 via 10.50.0.1 onlink", got)
	}

	// onlink without a gateway or a device is refused before anything changes.
	for _, r := range []*agentv1.Route{{Destination: "10.1.0.0/16", Device: "eth0", Onlink: true}, {Destination: "10.1.0.0/16", Gateway: "10.2.0.1", Onlink: true}} {
		if _, err := parseRequest(&agentv1.ConfigureNetworkRequest{Routes: []*agentv1.Route{r}}); err == nil || !strings.Contains(err.Error(), "onlink") {
			t.Errorf("route %v: %v, want a refusal naming onlink", r, err)
		}
	}
}
