package network

import (
	"errors"
	"fmt"
	"net"
	"os"
	"strings"

	"github.com/sirupsen/logrus"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/kiln-runtime/kiln/netdump"
	knetns "github.com/kiln-runtime/kiln/netns"
)

// Interface is one interface of the pod's namespace as the guest gets it.
type Interface struct {
	// Name, MAC and MTU are the host interface's; the guest's virtio-net device takes them.
	Name string
	MAC  net.HardwareAddr
	MTU  int
	// Addresses in CIDR form, IPv6 link-local ones left out (the guest derives its own from the same MAC).
	Addresses []string
	// Tap is the tap beside the interface: QEMU's side of the guest's device.
	Tap *os.File
	// tapName and index name the tap and the host interface for teardown; tapMade says Kiln made the tap (a
	// name taken by another's is not Kiln's to delete), qdisc that it added the interface's ingress qdisc.
	tapName string
	index   int
	tapMade bool
	qdisc   bool
	// txQLen is the interface's transmit queue length, which the kernel raises from 0 when it gets a qdisc.
	txQLen int
}

// Route is a route of the pod's namespace.
type Route struct {
	Destination string // CIDR, "" for a default route
	Gateway     string
	Device      string
	Source      string
	Family      int // 4 or 6
	Scope       int
	Metric      int
	MTU         int
	// OnLink: the gateway is on the device's link though nothing the device holds covers it.
	OnLink bool
}

// Neighbour is a permanent neighbour entry of the pod's namespace.
type Neighbour struct {
	Device string
	IP     string
	MAC    string
}

// Mirror is a pod namespace's interfaces redirected to taps. Its Close undoes it.
type Mirror struct {
	Interfaces []Interface
	Routes     []Route
	Neighbours []Neighbour
	nsPath     string
	// ns is the namespace nsPath named when it was mirrored: Close undoes nothing in another one the path names
	// by then (a /proc/<pid>/ns/net whose process is gone and whose pid is another's).
	ns  nsID
	log *logrus.Entry
}

// Limits on what a namespace may hold: a namespace is set up by CNI plugins and hooks, not by Kiln.
const (
	maxInterfaces = 16
	maxRoutes     = 512
	maxNeighbours = 512
)

// tapPrefix names the taps Kiln makes; a namespace holding one is mirrored already. It begins as cAdvisor's names
// of interfaces to leave out of a container's network statistics do (kubelet's, and the container_network_*
// metrics): a tap carries the pod interface's traffic again, the other way round, so a sum over the pod's
// interfaces would count it twice. legacyTapPrefix named them before (a pod an earlier Kiln mirrored).
const (
	tapPrefix       = "vethkilntap"
	legacyTapPrefix = "kilntap"
)

// isTap says whether the interface named name is a tap Kiln made.
func isTap(name string) bool {
	return strings.HasPrefix(name, tapPrefix) || strings.HasPrefix(name, legacyTapPrefix)
}

// MirrorNamespace reads the interfaces, routes and permanent neighbours of the namespace at path and redirects
// each interface (every link that is up, except lo) to a new tap beside it. A namespace another pod mirrors (it
// holds a Kiln tap) is refused. On error it leaves the namespace as it found it. The namespace is the one open as
// f, which path named when it was opened (OpenNamespace): the mirror (and its record, Save) names path, and is
// guarded by f's identity.
func MirrorNamespace(f *os.File, path string, log *logrus.Entry) (_ *Mirror, retErr error) {
	ns := netns.NsHandle(int(f.Fd()))
	id, err := identify(int(ns))
	if err != nil {
		return nil, fmt.Errorf("network namespace %s: %w", path, err)
	}
	h, err := netlink.NewHandleAt(ns, unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("netlink in network namespace %s: %w", path, err)
	}
	defer h.Close()
	m := &Mirror{nsPath: path, ns: id, log: log}
	defer func() {
		if retErr != nil {
			m.undo(h)
		}
	}()
	links, err := netdump.Consistent(h.LinkList)
	if err != nil {
		return nil, fmt.Errorf("list links in %s: %w", path, err)
	}
	for _, l := range links {
		if name := l.Attrs().Name; isTap(name) {
			// Mirrored already: its taps and redirects are another pod's, which this one's would break.
			return nil, fmt.Errorf("network namespace %s already holds Kiln's tap %s: another Kiln pod (or a VM not yet stopped) mirrors it; give each pod a network namespace of its own", path, name)
		}
	}
	names := map[int]string{}
	for _, l := range links {
		a := l.Attrs()
		if !takes(a) {
			continue
		}
		if len(a.HardwareAddr) != 6 {
			return nil, fmt.Errorf("interface %s in %s has no Ethernet address; Kiln mirrors Ethernet interfaces (veth, macvlan...)", a.Name, path)
		}
		if len(m.Interfaces) == maxInterfaces {
			return nil, fmt.Errorf("network namespace %s has more than %d interfaces", path, maxInterfaces)
		}
		ifc := Interface{Name: a.Name, MAC: a.HardwareAddr, MTU: a.MTU, index: a.Index, txQLen: a.TxQLen}
		addrs, err := netdump.Consistent(func() ([]netlink.Addr, error) { return h.AddrList(l, netlink.FAMILY_ALL) })
		if err != nil {
			return nil, fmt.Errorf("list addresses of %s: %w", a.Name, err)
		}
		for _, addr := range addrs {
			if addr.IP.To4() == nil && addr.IP.IsLinkLocalUnicast() {
				continue
			}
			ifc.Addresses = append(ifc.Addresses, addr.IPNet.String())
		}
		ifc.tapName = fmt.Sprintf("%s%d", tapPrefix, len(m.Interfaces))
		// Appended before the tap exists, so that undo removes whatever part of it was made.
		m.Interfaces = append(m.Interfaces, ifc)
		last := &m.Interfaces[len(m.Interfaces)-1]
		if last.Tap, err = openTap(ns, h, last.tapName, a.MTU); err != nil {
			return nil, fmt.Errorf("interface %s: %w", a.Name, err)
		}
		last.tapMade = true
		if err := redirect(h, last); err != nil {
			return nil, fmt.Errorf("interface %s: %w", a.Name, err)
		}
		names[a.Index] = a.Name
	}
	if err := m.readRoutes(h, names); err != nil {
		return nil, err
	}
	for idx, name := range names {
		neighs, err := netdump.Consistent(func() ([]netlink.Neigh, error) { return h.NeighList(idx, netlink.FAMILY_ALL) })
		if err != nil {
			return nil, fmt.Errorf("list neighbours of %s: %w", name, err)
		}
		for _, n := range neighs {
			if n.State&netlink.NUD_PERMANENT == 0 || n.IP == nil || len(n.HardwareAddr) == 0 {
				continue
			}
			if len(m.Neighbours) == maxNeighbours {
				return nil, fmt.Errorf("network namespace %s has more than %d permanent neighbours", path, maxNeighbours)
			}
			m.Neighbours = append(m.Neighbours, Neighbour{Device: name, IP: n.IP.String(), MAC: n.HardwareAddr.String()})
		}
	}
	return m, nil
}

func (m *Mirror) readRoutes(h *netlink.Handle, names map[int]string) error {
	routes, err := netdump.Consistent(func() ([]netlink.Route, error) {
		return h.RouteListFiltered(netlink.FAMILY_ALL, &netlink.Route{Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE)
	})
	if err != nil {
		return fmt.Errorf("list routes in %s: %w", m.nsPath, err)
	}
	for _, r := range routes {
		dev, ok := names[r.LinkIndex]
		if len(r.MultiPath) > 0 {
			// Its next hops name no single device (LinkIndex is 0): dropping it could leave the guest without
			// its default route and no word of why.
			return fmt.Errorf("network namespace %s has a route of %d next hops (%s): Kiln mirrors routes of one next hop; give the pod single-path routes", m.nsPath, len(r.MultiPath), r.String())
		}
		// The kernel's own routes (prefix routes of addresses, IPv6 link-local and multicast) come back in the
		// guest by themselves when it adds the same addresses. IPv4's link-local 169.254/16 is no such route:
		// Calico and the AWS VPC CNI route a pod's default through 169.254.1.1 on the link.
		if !ok || r.Protocol == unix.RTPROT_KERNEL {
			continue
		}
		if r.Dst != nil && r.Dst.IP.To4() == nil && (r.Dst.IP.IsLinkLocalUnicast() || r.Dst.IP.IsMulticast()) {
			continue
		}
		if len(m.Routes) == maxRoutes {
			return fmt.Errorf("network namespace %s has more than %d routes", m.nsPath, maxRoutes)
		}
		route := Route{Device: dev, Family: 4, Scope: int(r.Scope), Metric: r.Priority, MTU: r.MTU,
			OnLink: r.Flags&int(netlink.FLAG_ONLINK) != 0}
		if r.Family == netlink.FAMILY_V6 {
			route.Family = 6
		}
		if r.Dst != nil {
			if ones, _ := r.Dst.Mask.Size(); ones > 0 || !r.Dst.IP.IsUnspecified() {
				route.Destination = r.Dst.String()
			}
		}
		if r.Gw != nil {
			route.Gateway = r.Gw.String()
		}
		if r.Src != nil {
			route.Source = r.Src.String()
		}
		m.Routes = append(m.Routes, route)
	}
	return nil
}

// openTap creates a tap named name in ns and returns its file. The tap is not persistent: it disappears when
// the last descriptor of it (Kiln's and QEMU's) is closed, so a killed shim and QEMU leave none behind.
func openTap(ns netns.NsHandle, h *netlink.Handle, name string, mtu int) (*os.File, error) {
	// A tap is made in the namespace of the thread that opens /dev/net/tun.
	var tap *os.File
	err := knetns.Do(ns, func() error {
		var err error
		tap, err = createTap(name)
		return err
	})
	if err != nil {
		if tap != nil {
			_ = tap.Close()
		}
		return nil, err
	}
	link, err := h.LinkByName(name)
	if err == nil {
		err = h.LinkSetMTU(link, mtu)
	}
	if err == nil {
		err = h.LinkSetUp(link)
	}
	if err != nil {
		_ = tap.Close()
		return nil, fmt.Errorf("set up tap %s: %w", name, err)
	}
	return tap, nil
}

// createTap opens /dev/net/tun as a tap named name in the calling thread's namespace: no packet information
// header, a virtio-net header so that QEMU can pass offloads through.
func createTap(name string) (*os.File, error) {
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open /dev/net/tun: %w", err)
	}
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		_ = unix.Close(fd)
		return nil, fmt.Errorf("tap %s: %w", name, err)
	}
	ifr.SetUint16(unix.IFF_TAP | unix.IFF_NO_PI | unix.IFF_VNET_HDR)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		_ = unix.Close(fd)
		return nil, fmt.Errorf("create tap %s: %w", name, err)
	}
	return os.NewFile(uintptr(fd), "/dev/net/tun:"+name), nil
}

// ingressHandle is the handle of an ingress qdisc (ffff:).
var ingressHandle = netlink.MakeHandle(0xffff, 0)

// redirect sends everything arriving on the interface out of its tap and everything arriving on the tap out
// of the interface, before the namespace's own stack sees it.
func redirect(h *netlink.Handle, ifc *Interface) error {
	tap, err := h.LinkByName(ifc.tapName)
	if err != nil {
		return fmt.Errorf("find tap %s: %w", ifc.tapName, err)
	}
	if err := redirectLink(h, ifc.index, tap.Attrs().Index, &ifc.qdisc); err != nil {
		return err
	}
	var tapQdisc bool
	return redirectLink(h, tap.Attrs().Index, ifc.index, &tapQdisc)
}

func redirectLink(h *netlink.Handle, from, to int, added *bool) error {
	if err := h.QdiscAdd(ingressQdisc(from)); err != nil {
		if errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("link %d has an ingress qdisc already (a tc-based CNI plugin's?): Kiln redirects the interface's traffic through one of its own and needs it free: %w", from, err)
		}
		return fmt.Errorf("add ingress qdisc to link %d: %w", from, err)
	}
	*added = true
	// A u32 filter with no key matches every packet: this kernel has neither matchall nor flower.
	f := &netlink.U32{
		FilterAttrs: netlink.FilterAttrs{LinkIndex: from, Parent: ingressHandle, Priority: 1, Protocol: unix.ETH_P_ALL},
		Actions:     []netlink.Action{netlink.NewMirredAction(to)},
	}
	if err := h.FilterAdd(f); err != nil {
		return fmt.Errorf("redirect link %d to link %d: %w", from, to, err)
	}
	return nil
}

// Close removes the taps and the qdiscs Kiln added, leaving the namespace as CNI left it. A namespace or
// interface already gone (CNI DEL ran first) is not an error. QEMU must have exited, or the taps outlive this
// until it does.
func (m *Mirror) Close() error {
	h, err := undoHandle(m.nsPath, m.ns)
	if h == nil {
		m.closeTaps()
		return err
	}
	defer h.Close()
	return m.undo(h)
}

func (m *Mirror) closeTaps() {
	for i := range m.Interfaces {
		if t := m.Interfaces[i].Tap; t != nil {
			_ = t.Close()
			m.Interfaces[i].Tap = nil
		}
	}
}

func (m *Mirror) undo(h *netlink.Handle) error {
	m.closeTaps()
	var errs []error
	for _, ifc := range m.Interfaces {
		// The tap, non-persistent, went with its last descriptor (and its qdisc with it); delete it in case
		// QEMU still holds one.
		if !ifc.tapMade {
			continue // nor a qdisc: it comes after the tap
		}
		if tap, err := h.LinkByName(ifc.tapName); err == nil {
			if err := h.LinkDel(tap); err != nil && !notFound(err) {
				errs = append(errs, fmt.Errorf("delete tap %s: %w", ifc.tapName, err))
			}
		}
		if !ifc.qdisc {
			continue
		}
		if err := removeIngress(h, ifc.index, ifc.Name); err != nil {
			errs = append(errs, err)
		}
		if link, err := h.LinkByIndex(ifc.index); err == nil {
			if err := restoreTxQLen(h, link, ifc.txQLen); err != nil {
				errs = append(errs, err)
			}
		}
	}
	if len(errs) > 0 {
		m.log.WithError(errors.Join(errs...)).Warn("tear down pod network")
		return fmt.Errorf("tear down network of %s: %w", m.nsPath, errors.Join(errs...))
	}
	return nil
}

// ingressQdisc is the ingress qdisc of the link with index.
func ingressQdisc(index int) *netlink.Ingress {
	return &netlink.Ingress{QdiscAttrs: netlink.QdiscAttrs{LinkIndex: index, Parent: netlink.HANDLE_INGRESS, Handle: ingressHandle}}
}

// removeIngress removes a link's ingress qdisc, and with it the redirect filters on it. A qdisc or link already
// gone is not an error (the kernel answers EINVAL for a link without the qdisc).
func removeIngress(h *netlink.Handle, index int, name string) error {
	if err := h.QdiscDel(ingressQdisc(index)); err != nil && !notFound(err) && !errors.Is(err, unix.EINVAL) {
		return fmt.Errorf("remove ingress qdisc of %s: %w", name, err)
	}
	return nil
}

// restoreTxQLen sets a link's transmit queue length back to want: the kernel raises a length of 0 to 1000 when
// the link gets a qdisc, and does not lower it again.
func restoreTxQLen(h *netlink.Handle, link netlink.Link, want int) error {
	if link.Attrs().TxQLen == want {
		return nil
	}
	if err := h.LinkSetTxQLen(link, want); err != nil {
		return fmt.Errorf("restore transmit queue length of %s: %w", link.Attrs().Name, err)
	}
	return nil
}

func notFound(err error) bool {
	var lnf netlink.LinkNotFoundError
	return errors.As(err, &lnf) || errors.Is(err, unix.ENODEV) || errors.Is(err, unix.ENOENT)
}
