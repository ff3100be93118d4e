package network

import (
	"fmt"
	"net"
	"strings"

	"github.com/vishvananda/netlink"

	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
)

// Limits on one request: far beyond any pod, small enough that a request cannot make the agent loop for long.
const (
	maxInterfaces = 32
	maxAddresses  = 64
	maxRoutes     = 1024
	maxNeighbours = 1024
)

// setup is a ConfigureNetworkRequest checked and parsed whole, before anything in the guest changes: a request
// with one bad field changes nothing, instead of leaving devices moved and half configured.
type setup struct {
	interfaces []ifaceSetup
	// routes on a link come first: a gateway must be reachable before a route through it is accepted.
	routes     []routeSetup
	neighbours []neighbourSetup
}

type ifaceSetup struct {
	name  string
	mac   net.HardwareAddr
	mtu   int
	addrs []*netlink.Addr
}

type routeSetup struct {
	route  netlink.Route // without its link, which is looked up by device when it is added
	device string
	dest   string // as the request wrote it, for errors
}

type neighbourSetup struct {
	device string
	neigh  netlink.Neigh // without its link
}

// parseRequest checks req's limits and parses every field; each error names the field and its value.
func parseRequest(req *agentv1.ConfigureNetworkRequest) (*setup, error) {
	if err := checkLimits(req); err != nil {
		return nil, err
	}
	s := &setup{}
	for _, want := range req.GetInterfaces() {
		if err := checkLinkName(want.GetName()); err != nil {
			return nil, fmt.Errorf("interface %q: %w", want.GetName(), err)
		}
		mac, err := net.ParseMAC(want.GetMac())
		if err != nil {
			return nil, fmt.Errorf("interface %s: MAC %q: %w", want.GetName(), want.GetMac(), err)
		}
		ifc := ifaceSetup{name: want.GetName(), mac: mac, mtu: int(want.GetMtu())}
		for _, a := range want.GetAddresses() {
			addr, err := netlink.ParseAddr(a)
			if err != nil {
				return nil, fmt.Errorf("interface %s: address %q: %w", want.GetName(), a, err)
			}
			ifc.addrs = append(ifc.addrs, addr)
		}
		s.interfaces = append(s.interfaces, ifc)
	}
	var viaGateway []routeSetup
	for _, r := range req.GetRoutes() {
		rs, err := parseRoute(r)
		if err != nil {
			return nil, err
		}
		if rs.route.Gw == nil {
			s.routes = append(s.routes, rs)
		} else {
			viaGateway = append(viaGateway, rs)
		}
	}
	s.routes = append(s.routes, viaGateway...)
	for _, n := range req.GetNeighbours() {
		ns, err := parseNeighbour(n)
		if err != nil {
			return nil, err
		}
		s.neighbours = append(s.neighbours, ns)
	}
	return s, nil
}

func checkLimits(req *agentv1.ConfigureNetworkRequest) error {
	if n := len(req.GetInterfaces()); n > maxInterfaces {
		return fmt.Errorf("%d interfaces, at most %d", n, maxInterfaces)
	}
	for _, i := range req.GetInterfaces() {
		if n := len(i.GetAddresses()); n > maxAddresses {
			return fmt.Errorf("interface %s: %d addresses, at most %d", i.GetName(), n, maxAddresses)
		}
	}
	if n := len(req.GetRoutes()); n > maxRoutes {
		return fmt.Errorf("%d routes, at most %d", n, maxRoutes)
	}
	if n := len(req.GetNeighbours()); n > maxNeighbours {
		return fmt.Errorf("%d neighbours, at most %d", n, maxNeighbours)
	}
	return nil
}

// checkLinkName applies the kernel's rules for an interface name (dev_valid_name): 1 to 15 bytes, not "." or
// "..", no '/', ':' or white space.
func checkLinkName(name string) error {
	if name == "" || len(name) > 15 || name == "." || name == ".." || strings.ContainsAny(name, "/: \t\n\v\f\r") {
		return fmt.Errorf("not a valid interface name (1 to 15 bytes, no '/', ':' or spaces)")
	}
	return nil
}

func parseRoute(r *agentv1.Route) (routeSetup, error) {
	rs := routeSetup{device: r.GetDevice(), dest: r.GetDestination(), route: netlink.Route{
		Scope:    netlink.Scope(r.GetScope()),
		Priority: int(r.GetMetric()),
		MTU:      int(r.GetMtu()),
		Family:   family(r.GetFamily()),
	}}
	if d := r.GetDestination(); d != "" {
		_, dst, err := net.ParseCIDR(d)
		if err != nil {
			return rs, fmt.Errorf("route to %q: %w", d, err)
		}
		rs.route.Dst = dst
	}
	if g := r.GetGateway(); g != "" {
		if rs.route.Gw = net.ParseIP(g); rs.route.Gw == nil {
			return rs, fmt.Errorf("route to %q: gateway %q is not an IP address", r.GetDestination(), g)
		}
	}
	if r.GetOnlink() {
		if rs.route.Gw == nil || r.GetDevice() == "" {
			return rs, fmt.Errorf("route to %q: onlink needs a gateway and a device", r.GetDestination())
		}
		rs.route.Flags = int(netlink.FLAG_ONLINK)
	}
	if s := r.GetSource(); s != "" {
		if rs.route.Src = net.ParseIP(s); rs.route.Src == nil {
			return rs, fmt.Errorf("route to %q: source %q is not an IP address", r.GetDestination(), s)
		}
	}
	if d := r.GetDevice(); d != "" {
		if err := checkLinkName(d); err != nil {
			return rs, fmt.Errorf("route to %q: device %q: %w", r.GetDestination(), d, err)
		}
	}
	return rs, nil
}

func family(f uint32) int {
	if f == 6 {
		return netlink.FAMILY_V6
	}
	return netlink.FAMILY_V4
}

func parseNeighbour(n *agentv1.Neighbour) (neighbourSetup, error) {
	if err := checkLinkName(n.GetDevice()); err != nil {
		return neighbourSetup{}, fmt.Errorf("neighbour %s: device %q: %w", n.GetIp(), n.GetDevice(), err)
	}
	ip := net.ParseIP(n.GetIp())
	if ip == nil {
		return neighbourSetup{}, fmt.Errorf("neighbour %q is not an IP address", n.GetIp())
	}
	mac, err := net.ParseMAC(n.GetMac())
	if err != nil {
		return neighbourSetup{}, fmt.Errorf("neighbour %s: MAC %q: %w", n.GetIp(), n.GetMac(), err)
	}
	fam := netlink.FAMILY_V4
	if ip.To4() == nil {
		fam = netlink.FAMILY_V6
	}
	return neighbourSetup{device: n.GetDevice(),
		neigh: netlink.Neigh{Family: fam, State: netlink.NUD_PERMANENT, IP: ip, HardwareAddr: mac}}, nil
}
