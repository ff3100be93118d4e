package cri

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// CNIBinDir is where Debian's containernetworking-plugins installs bridge, host-local, portmap and loopback.
const CNIBinDir = "/usr/lib/cni"

// Network is the CNI network a harness containerd gives its pods: one Linux bridge (the host side is the
// gateway, so pod IPs answer from the host), host-local IPAM keeping its state under the harness's directory,
// and portmap for host ports.
type Network struct {
	// Name is the CNI network name; Bridge the host bridge's name (at most 15 bytes).
	Name   string
	Bridge string
	// Subnet4 is the IPv4 pod range; Subnet6, when set, makes the network dual-stack.
	Subnet4 *net.IPNet
	Subnet6 *net.IPNet
	// MTU of the bridge and the pods' interfaces; 0 leaves the plugin's default.
	MTU int
	// DataDir holds host-local's allocations.
	DataDir string
}

// NetworkOptions choose what NewNetwork sets beyond its defaults.
type NetworkOptions struct {
	DualStack bool
	MTU       int
}

// NewNetwork picks a bridge name and an IPv4 /24 (10.213.N.0/24, and fd6b:696c:6e00:N::/64 when dual-stack)
// that no host address or route uses, with host-local's state under dir.
func NewNetwork(dir string, opts NetworkOptions) (*Network, error) {
	used, err := usedPrefixes()
	if err != nil {
		return nil, err
	}
	// Random among the free ones, so harnesses of test packages running in parallel rarely meet.
	for _, n := range rand.Perm(250) {
		n++
		_, v4, _ := net.ParseCIDR(fmt.Sprintf("10.213.%d.0/24", n))
		if overlapsAny(v4, used) {
			continue
		}
		bridge := fmt.Sprintf("kcri%d", n)
		if _, err := net.InterfaceByName(bridge); err == nil {
			continue
		}
		nw := &Network{Name: fmt.Sprintf("kiln-cri-%d", n), Bridge: bridge, Subnet4: v4, MTU: opts.MTU, DataDir: dir}
		if opts.DualStack {
			_, v6, _ := net.ParseCIDR(fmt.Sprintf("fd6b:696c:6e00:%x::/64", n))
			if overlapsAny(v6, used) {
				continue
			}
			nw.Subnet6 = v6
		}
		return nw, nil
	}
	return nil, fmt.Errorf("no free 10.213.N.0/24 for a CNI bridge network")
}

// usedPrefixes lists the host's addresses and route destinations.
func usedPrefixes() ([]*net.IPNet, error) {
	var nets []*net.IPNet
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return nil, fmt.Errorf("list host addresses: %w", err)
	}
	for _, a := range addrs {
		if n, ok := a.(*net.IPNet); ok {
			nets = append(nets, n)
		}
	}
	for _, family := range []string{"-4", "-6"} {
		out, err := exec.Command("ip", family, "-o", "route", "show", "table", "all").Output()
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(out), "\n") {
			f := strings.Fields(line)
			if len(f) == 0 {
				continue
			}
			dst := f[0]
			if dst == "unicast" || dst == "local" || dst == "broadcast" || dst == "multicast" {
				if len(f) < 2 {
					continue
				}
				dst = f[1]
			}
			if dst == "default" {
				continue
			}
			if !strings.Contains(dst, "/") {
				if strings.Contains(dst, ":") {
					dst += "/128"
				} else {
					dst += "/32"
				}
			}
			if _, n, err := net.ParseCIDR(dst); err == nil {
				nets = append(nets, n)
			}
		}
	}
	return nets, nil
}

func overlapsAny(n *net.IPNet, others []*net.IPNet) bool {
	for _, o := range others {
		if o.Contains(n.IP) || n.Contains(o.IP) {
			return true
		}
	}
	return false
}

// Gateway4 is the bridge's (the host's) IPv4 address in the pod network: the subnet's first address.
func (nw *Network) Gateway4() net.IP { return firstHost(nw.Subnet4) }

func firstHost(n *net.IPNet) net.IP {
	ip := make(net.IP, len(n.IP))
	copy(ip, n.IP)
	ip[len(ip)-1]++
	return ip
}

// ConfList is the network's CNI configuration list (bridge + portmap).
func (nw *Network) ConfList() ([]byte, error) {
	ranges := [][]map[string]string{{{"subnet": nw.Subnet4.String(), "gateway": nw.Gateway4().String()}}}
	routes := []map[string]string{{"dst": "0.0.0.0/0"}}
	if nw.Subnet6 != nil {
		ranges = append(ranges, []map[string]string{{"subnet": nw.Subnet6.String(), "gateway": firstHost(nw.Subnet6).String()}})
		routes = append(routes, map[string]string{"dst": "::/0"})
	}
	bridge := map[string]any{
		"type":        "bridge",
		"bridge":      nw.Bridge,
		"isGateway":   true,
		"ipMasq":      false,
		"hairpinMode": true,
		"ipam": map[string]any{
			"type":    "host-local",
			"ranges":  ranges,
			"routes":  routes,
			"dataDir": nw.DataDir,
		},
	}
	if nw.MTU > 0 {
		bridge["mtu"] = nw.MTU
	}
	return json.MarshalIndent(map[string]any{
		"cniVersion": "1.0.0",
		"name":       nw.Name,
		"plugins": []any{
			bridge,
			map[string]any{"type": "portmap", "capabilities": map[string]bool{"portMappings": true}, "snat": true},
		},
	}, "", "  ")
}

// WriteConf writes the configuration list into confDir as the only (so the first) file CRI loads.
func (nw *Network) WriteConf(confDir string) error {
	b, err := nw.ConfList()
	if err != nil {
		return err
	}
	if err := os.MkdirAll(confDir, 0o755); err != nil {
		return fmt.Errorf("create CNI conf dir: %w", err)
	}
	return os.WriteFile(filepath.Join(confDir, "10-"+nw.Name+".conflist"), b, 0o644)
}

// Remove deletes the bridge (CNI's DEL leaves it) when it exists.
func (nw *Network) Remove() error {
	if _, err := net.InterfaceByName(nw.Bridge); err != nil {
		return nil
	}
	if out, err := exec.Command("ip", "link", "del", nw.Bridge).CombinedOutput(); err != nil {
		return fmt.Errorf("delete bridge %s: %w: %s", nw.Bridge, err, out)
	}
	return nil
}
