package network

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"
)

// netnsWithVeth makes a named namespace holding eth0 (one end of a veth pair whose peer stays on the host) with
// the given ip commands run in it, and removes both at the end of the test.
func netnsWithVeth(t *testing.T, setup ...string) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to create network namespaces")
	}
	name := "kilntest" + strings.ReplaceAll(t.Name(), "/", "")[len("Test"):]
	if len(name) > 20 {
		name = name[:20]
	}
	host := "kv" + name[len(name)-8:]
	run := func(args ...string) {
		t.Helper()
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, out)
		}
	}
	run("netns", "add", name)
	t.Cleanup(func() {
		_ = exec.Command("ip", "link", "del", host).Run()
		_ = exec.Command("ip", "netns", "del", name).Run()
	})
	run("link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", name)
	run("link", "set", host, "up")
	run("-n", name, "link", "set", "eth0", "txqueuelen", "0", "up")
	for _, s := range setup {
		run(append([]string{"-n", name}, strings.Fields(s)...)...)
	}
	return filepath.Join("/var/run/netns", name)
}

func ipIn(t *testing.T, path string, args ...string) string {
	t.Helper()
	out, err := exec.Command("ip", append([]string{"-n", filepath.Base(path)}, args...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("ip %v: %v: %s", args, err, out)
	}
	return string(out)
}

func TestMirrorNamespace(t *testing.T) {
	ns := netnsWithVeth(t,
		"link set eth0 mtu 1400",
		"addr add 10.99.0.5/24 dev eth0",
		"addr add fd99::5/64 dev eth0 nodad",
		"route add default via 10.99.0.1",
		"route add 10.98.0.0/16 via 10.99.0.2 metric 7",
		"neigh add 10.99.0.9 lladdr 02:00:00:00:00:09 dev eth0 nud permanent",
	)
	before := []string{ipIn(t, ns, "link"), ipIn(t, ns, "route"), ipIn(t, ns, "-6", "route"), ipIn(t, ns, "addr")}
	qdiscBefore := tc(t, ns)

	m, err := MirrorNamespace(openNS(t, ns), ns, logrus.NewEntry(logrus.New()))
	if err != nil {
		t.Fatal(err)
	}
	if len(m.Interfaces) != 1 {
		t.Fatalf("interfaces %+v", m.Interfaces)
	}
	ifc := m.Interfaces[0]
	if ifc.Name != "eth0" || ifc.MTU != 1400 || ifc.Tap == nil {
		t.Errorf("interface %+v", ifc)
	}
	if !slices.Equal(ifc.Addresses, []string{"10.99.0.5/24", "fd99::5/64"}) {
		t.Errorf("addresses %v (link-local must be left out)", ifc.Addresses)
	}
	var routes []string
	for _, r := range m.Routes {
		routes = append(routes, r.Destination+" via "+r.Gateway+" dev "+r.Device)
	}
	for _, want := range []string{" via 10.99.0.1 dev eth0", "10.98.0.0/16 via 10.99.0.2 dev eth0"} {
		if !slices.Contains(routes, want) {
			t.Errorf("routes %q lack %q", routes, want)
		}
	}
	if len(m.Routes) != 2 {
		t.Errorf("routes %q: kernel routes must be left out", routes)
	}
	if len(m.Neighbours) != 1 || m.Neighbours[0].IP != "10.99.0.9" || m.Neighbours[0].MAC != "02:00:00:00:00:09" {
		t.Errorf("neighbours %+v", m.Neighbours)
	}
	links := ipIn(t, ns, "link")
	if !strings.Contains(links, "kilntap0") || !strings.Contains(links, "mtu 1400") {
		t.Errorf("no tap beside eth0:\n%s", links)
	}
	filters := ipIn(t, ns, "link") + tc(t, ns)
	if !strings.Contains(filters, "mirred") {
		t.Errorf("no mirred redirect:\n%s", filters)
	}

	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	after := []string{ipIn(t, ns, "link"), ipIn(t, ns, "route"), ipIn(t, ns, "-6", "route"), ipIn(t, ns, "addr")}
	if !slices.Equal(before, after) {
		t.Errorf("namespace changed:\nbefore %q\nafter  %q", before, after)
	}
	if q := tc(t, ns); q != qdiscBefore {
		t.Errorf("qdiscs changed:\nbefore %s\nafter %s", qdiscBefore, q)
	}
}

// A pod addressed as Calico and the AWS VPC CNI address theirs (a /32, its default route through 169.254.1.1,
// which a link route reaches) keeps both routes, and a route marked onlink keeps the mark; a route of several
// next hops is refused, naming it, rather than dropped.
func TestMirrorGatewayOnTheLink(t *testing.T) {
	ns := netnsWithVeth(t,
		"addr add 10.99.0.5/32 dev eth0",
		"route add 169.254.1.1 dev eth0 scope link",
		"route add default via 169.254.1.1 dev eth0",
		"route add 10.97.0.0/16 via 10.50.0.1 dev eth0 onlink",
	)
	m, err := MirrorNamespace(openNS(t, ns), ns, logrus.NewEntry(logrus.New()))
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	var routes []string
	for _, r := range m.Routes {
		routes = append(routes, fmt.Sprintf("%s via %s dev %s scope %d onlink %v", r.Destination, r.Gateway, r.Device, r.Scope, r.OnLink))
	}
	want := []string{
		" via 169.254.1.1 dev eth0 scope 0 onlink false",
		"10.97.0.0/16 via 10.50.0.1 dev eth0 scope 0 onlink true",
		"169.254.1.1/32 via  dev eth0 scope 253 onlink false",
	}
	slices.Sort(routes)
	if !slices.Equal(routes, want) {
		t.Errorf("routes\n%q\nwant\n%q", routes, want)
	}
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}

	ipIn(t, ns, "addr", "add", "10.96.0.5/24", "dev", "eth0")
	ipIn(t, ns, "route", "add", "10.95.0.0/16", "nexthop", "via", "10.96.0.1", "dev", "eth0", "nexthop", "via", "10.96.0.2", "dev", "eth0")
	if m, err := MirrorNamespace(openNS(t, ns), ns, logrus.NewEntry(logrus.New())); err == nil || !strings.Contains(err.Error(), "2 next hops") {
		if m != nil {
			m.Close()
		}
		t.Fatalf("a multipath route mirrored: %v", err)
	}
	if links := ipIn(t, ns, "link"); strings.Contains(links, tapPrefix) {
		t.Errorf("a refused mirror left its tap:\n%s", links)
	}
}

// tc lists the namespace's qdiscs and ingress filters of eth0.
func tc(t *testing.T, ns string) string {
	t.Helper()
	out, err := exec.Command("ip", "netns", "exec", filepath.Base(ns), "sh", "-c", "tc qdisc show; tc filter show dev eth0 ingress").CombinedOutput()
	if err != nil {
		t.Fatalf("tc: %v: %s", err, out)
	}
	return string(out)
}

// A namespace another pod mirrors is refused, and the refusal leaves that pod's tap and redirect alone; an undo
// never deletes a tap of the name that Kiln did not make.
func TestMirrorRefusesAMirroredNamespace(t *testing.T) {
	ns := netnsWithVeth(t, "addr add 10.99.2.5/24 dev eth0")
	first, err := MirrorNamespace(openNS(t, ns), ns, logrus.NewEntry(logrus.New()))
	if err != nil {
		t.Fatal(err)
	}
	defer first.Close()
	before := ipIn(t, ns, "link") + tc(t, ns)
	if _, err := MirrorNamespace(openNS(t, ns), ns, logrus.NewEntry(logrus.New())); err == nil || !strings.Contains(err.Error(), "already holds Kiln's tap vethkilntap0") {
		t.Fatalf("second mirror of %s = %v, want a refusal naming the tap", ns, err)
	}
	if after := ipIn(t, ns, "link") + tc(t, ns); after != before {
		t.Errorf("the refused mirror changed the namespace:\nbefore %s\nafter %s", before, after)
	}
	// A mirror whose tap's name was taken (its open failed) undoes nothing of that tap.
	m := &Mirror{nsPath: ns, log: logrus.NewEntry(logrus.New()), Interfaces: []Interface{{Name: "eth0", tapName: "kilntap0"}}}
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	if after := ipIn(t, ns, "link") + tc(t, ns); after != before {
		t.Errorf("undoing a mirror that made no tap changed the namespace:\nbefore %s\nafter %s", before, after)
	}
}

// An interface whose ingress qdisc is taken (a tc-based CNI plugin's) is refused naming it and why, and the
// namespace is left as it was.
func TestMirrorRefusesATakenIngressQdisc(t *testing.T) {
	ns := netnsWithVeth(t, "addr add 10.99.3.5/24 dev eth0")
	if out, err := exec.Command("ip", "netns", "exec", filepath.Base(ns), "tc", "qdisc", "add", "dev", "eth0", "ingress").CombinedOutput(); err != nil {
		t.Fatalf("tc: %v: %s", err, out)
	}
	before := ipIn(t, ns, "link") + tc(t, ns)
	_, err := MirrorNamespace(openNS(t, ns), ns, logrus.NewEntry(logrus.New()))
	if err == nil || !strings.Contains(err.Error(), "interface eth0: ") || !strings.Contains(err.Error(), "ingress qdisc already") {
		t.Fatalf("mirror of an interface with an ingress qdisc = %v, want a refusal naming eth0 and the qdisc", err)
	}
	if after := ipIn(t, ns, "link") + tc(t, ns); after != before {
		t.Errorf("the refused mirror changed the namespace:\nbefore %s\nafter %s", before, after)
	}
}

func TestMirrorAfterCNIDelete(t *testing.T) {
	ns := netnsWithVeth(t, "addr add 10.99.1.5/24 dev eth0")
	m, err := MirrorNamespace(openNS(t, ns), ns, logrus.NewEntry(logrus.New()))
	if err != nil {
		t.Fatal(err)
	}
	// CNI DEL removes the interface, and the runtime may delete the namespace, before the VM is torn down.
	ipIn(t, ns, "link", "del", "eth0")
	if err := m.Close(); err != nil {
		t.Errorf("close after the interface went: %v", err)
	}
	if out := ipIn(t, ns, "link"); strings.Contains(out, "kilntap") {
		t.Errorf("tap left behind:\n%s", out)
	}
}

func TestHolder(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	ns := netnsWithVeth(t)
	for _, path := range []string{"", ns} {
		h, err := StartHolder(path)
		if err != nil {
			t.Fatal(err)
		}
		got, err := os.Readlink(h.NSPath())
		if err != nil {
			t.Fatal(err)
		}
		self, _ := os.Readlink("/proc/self/ns/net")
		if path == "" && got == self {
			t.Errorf("holder of a new namespace is in the host's (%s)", got)
		}
		if path != "" {
			var st1, st2 os.FileInfo
			st1, _ = os.Stat(path)
			st2, _ = os.Stat(h.NSPath())
			if !os.SameFile(st1, st2) {
				t.Errorf("holder is in %s, not %s", got, path)
			}
		}
		h.Close()
	}
}

func TestMain(m *testing.M) {
	// The test binary is its own holder (StartHolder runs os.Executable).
	RunHolderIfAsked()
	os.Exit(m.Run())
}

func TestUnmirrorAfterAKilledOwner(t *testing.T) {
	ns := netnsWithVeth(t, "addr add 10.99.2.5/24 dev eth0")
	before := ipIn(t, ns, "link") + tc(t, ns)
	m, err := MirrorNamespace(openNS(t, ns), ns, logrus.NewEntry(logrus.New()))
	if err != nil {
		t.Fatal(err)
	}
	state := filepath.Join(t.TempDir(), "network.json")
	if err := m.Save(state); err != nil {
		t.Fatal(err)
	}
	// The owner dies: its tap descriptors close (the tap goes) and Close never runs.
	m.closeTaps()
	if err := Unmirror(state); err != nil {
		t.Fatal(err)
	}
	if after := ipIn(t, ns, "link") + tc(t, ns); after != before {
		t.Errorf("namespace after Unmirror:\n%s\nbefore:\n%s", after, before)
	}
}

func TestUnmirrorWithoutState(t *testing.T) {
	if err := Unmirror(filepath.Join(t.TempDir(), "none.json")); err != nil {
		t.Errorf("no state: %v", err)
	}
	bad := filepath.Join(t.TempDir(), "bad.json")
	if err := os.WriteFile(bad, []byte(`{"namespace":"relative"}`), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := Unmirror(bad); err == nil {
		t.Error("relative namespace accepted")
	}
}

// The host's network namespace named by a path (`--with-ns network:/proc/1/ns/net`) is refused as host
// networking; a namespace of its own passes; a missing one is named.
func TestCheckNotHost(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	if err := CheckNotHost("/proc/self/ns/net"); !errors.Is(err, errdefs.ErrInvalidArgument) || !strings.Contains(err.Error(), "host networking") {
		t.Errorf("the host's namespace: %v, want InvalidArgument naming host networking", err)
	}
	h, err := StartHolder("")
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	if err := CheckNotHost(h.NSPath()); err != nil {
		t.Errorf("a namespace of its own: %v", err)
	}
	if err := CheckNotHost("/nonexistent/ns"); !errors.Is(err, errdefs.ErrInvalidArgument) || !strings.Contains(err.Error(), "/nonexistent/ns") {
		t.Errorf("a missing namespace: %v", err)
	}
	// OpenNamespace checks the namespace it opened.
	if f, err := OpenNamespace("/proc/self/ns/net"); !errors.Is(err, errdefs.ErrInvalidArgument) || !strings.Contains(err.Error(), "host networking") {
		t.Errorf("open the host's namespace: %v, want InvalidArgument naming host networking", err)
		if f != nil {
			f.Close()
		}
	}
	f, err := OpenNamespace(h.NSPath())
	if err != nil {
		t.Fatalf("open a namespace of its own: %v", err)
	}
	f.Close()
	if _, err := OpenNamespace("/nonexistent/ns"); !errors.Is(err, errdefs.ErrInvalidArgument) || !strings.Contains(err.Error(), "/nonexistent/ns") {
		t.Errorf("open a missing namespace: %v", err)
	}
}

// A namespace opened once is the one mirrored and recorded, whatever its path names by then (here a new namespace
// mounted over it): the pod reaches the namespace the spec named as it was checked.
func TestMirrorNamespaceMirrorsTheNamespaceOpened(t *testing.T) {
	ns := netnsWithVeth(t, "addr add 10.99.0.7/24 dev eth0")
	f, err := OpenNamespace(ns)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	other := filepath.Base(ns) + "b"
	if out, err := exec.Command("ip", "netns", "add", other).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v: %s", err, out)
	}
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", other).Run() })
	if out, err := exec.Command("mount", "--bind", "/var/run/netns/"+other, ns).CombinedOutput(); err != nil {
		t.Fatalf("mount --bind: %v: %s", err, out)
	}
	t.Cleanup(func() { _ = exec.Command("umount", ns).Run() })
	state := filepath.Join(t.TempDir(), "mirror.json")
	if err := SaveNamespace(state, f, ns); err != nil {
		t.Fatal(err)
	}
	m, err := MirrorNamespace(f, ns, logrus.NewEntry(logrus.New()))
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if len(m.Interfaces) != 1 || !slices.Contains(m.Interfaces[0].Addresses, "10.99.0.7/24") {
		t.Fatalf("mirrored %+v, want the opened namespace's eth0 with 10.99.0.7/24", m.Interfaces)
	}
	if out := ipIn(t, "/var/run/netns/"+other, "link"); strings.Contains(out, "kilntap") {
		t.Errorf("a tap went into the namespace now at the path:\n%s", out)
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(state); err != nil || !strings.Contains(string(b), fmt.Sprint(st.Ino)) {
		t.Errorf("the record does not name the opened namespace (inode %d): %s, %v", st.Ino, b, err)
	}
}

// A namespace path that names another namespace by the time the mirror is undone (a /proc/<pid>/ns/net whose
// process went and whose pid another took, another pod's holder among them) is left alone by Close and by
// Unmirror: the taps there are another pod's.
func TestUndoLeavesAnotherNamespaceAtThePath(t *testing.T) {
	ns := netnsWithVeth(t, "addr add 10.99.0.5/24 dev eth0")
	state := filepath.Join(t.TempDir(), "mirror.json")
	if err := SaveNamespace(state, openNS(t, ns), ns); err != nil {
		t.Fatal(err)
	}
	m, err := MirrorNamespace(openNS(t, ns), ns, logrus.NewEntry(logrus.New()))
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Save(state); err != nil {
		t.Fatal(err)
	}
	// The path now names a new namespace (mounted over it), holding a tap of Kiln's name: another pod's.
	other := filepath.Base(ns) + "b"
	if out, err := exec.Command("ip", "netns", "add", other).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v: %s", err, out)
	}
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", other).Run() })
	if out, err := exec.Command("ip", "-n", other, "tuntap", "add", "kilntap0", "mode", "tap").CombinedOutput(); err != nil {
		t.Fatalf("ip tuntap add: %v: %s", err, out)
	}
	if out, err := exec.Command("mount", "--bind", "/var/run/netns/"+other, ns).CombinedOutput(); err != nil {
		t.Fatalf("mount --bind: %v: %s", err, out)
	}
	t.Cleanup(func() { _ = exec.Command("umount", ns).Run() })

	if err := m.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := Unmirror(state); err != nil {
		t.Fatalf("Unmirror: %v", err)
	}
	if out := ipIn(t, "/var/run/netns/"+other, "link"); !strings.Contains(out, "kilntap0") {
		t.Errorf("the other namespace's tap was deleted:\n%s", out)
	}
}

// openNS opens the network namespace at path for the test.
func openNS(t *testing.T, path string) *os.File {
	t.Helper()
	f, err := OpenNamespace(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

// Kiln's taps begin as cAdvisor's names of interfaces left out of a container's network statistics do ("veth"),
// and those an earlier Kiln named (a pod it mirrored, unmirrored by this one's `delete`) are Kiln's too.
func TestIsTap(t *testing.T) {
	for name, want := range map[string]bool{"vethkilntap0": true, "kilntap1": true, "eth0": false, "veth1a2b3c": false, "net1": false} {
		if got := isTap(name); got != want {
			t.Errorf("isTap(%q) = %v, want %v", name, got, want)
		}
	}
	if !strings.HasPrefix(tapPrefix, "veth") {
		t.Errorf("tap prefix %q: cAdvisor would count the taps' traffic in the pod's", tapPrefix)
	}
}
