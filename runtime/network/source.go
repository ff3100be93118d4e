// Package network is the host side of a pod's network: it finds the network namespace a spec names, holds a
// process in it for OCI hooks, and mirrors its interfaces into the VM. For each interface it creates a tap beside
// it in the same namespace and redirects traffic both ways with tc (an ingress qdisc with a match-all u32 filter
// and a mirred redirect), so that the guest's virtio-net device, backed by the tap, sends and receives what the
// interface would. QEMU gets the taps as file descriptors and never runs a script; the agent gives the guest
// interfaces the host interfaces' MACs, MTUs, addresses, routes and neighbours (agent/network).
package network

import (
	"fmt"
	"net"
	"os"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/kiln-runtime/kiln/netdump"
)

// Source is where a pod's network comes from.
type Source struct {
	// Path is the network namespace to mirror (CRI's pod namespace, `ctr run --with-ns network:<path>`).
	Path string
	// New asks for a namespace of the pod's own: empty unless hooks configure it.
	New bool
}

// SourceOf reads the network namespace of a pod's first container's spec. A spec without one (host networking)
// is an error: a VM cannot share the host's network stack.
func SourceOf(spec *specs.Spec) (Source, error) {
	if spec.Linux != nil {
		for _, ns := range spec.Linux.Namespaces {
			if ns.Type == specs.NetworkNamespace {
				if ns.Path != "" {
					return Source{Path: ns.Path}, nil
				}
				return Source{New: true}, nil
			}
		}
	}
	return Source{}, fmt.Errorf("%w: the spec has no network namespace (host networking): a Kiln container runs in its own VM and cannot share the host's network; remove hostNetwork / --net-host, or use runc for it", errdefs.ErrInvalidArgument)
}

// CheckNotHost refuses a namespace path that names the shim's own network namespace, the host's where
// containerd runs (`ctr run --with-ns network:/proc/1/ns/net`): that is host networking by another name, and
// mirroring it would send the host's traffic into the VM.
func CheckNotHost(path string) error {
	var ns unix.Stat_t
	if err := unix.Stat(path, &ns); err != nil {
		return fmt.Errorf("%w: network namespace %s: %v", errdefs.ErrInvalidArgument, path, err)
	}
	return notHost(path, &ns)
}

// OpenNamespace opens the network namespace at path, once, for everything done to it after: a path that names
// another namespace by then (a /proc/<pid>/ns/net whose pid was reused, by a process of the host's network among
// others) changes nothing. As CheckNotHost, it refuses the host's namespace, now that it is open.
func OpenNamespace(path string) (*os.File, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("%w: network namespace %s: %v", errdefs.ErrInvalidArgument, path, err)
	}
	var ns unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &ns); err != nil {
		f.Close()
		return nil, fmt.Errorf("network namespace %s: %w", path, err)
	}
	if err := notHost(path, &ns); err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

// FilePath names ns, an open namespace, by its descriptor in this process's /proc: for what takes a path but must
// reach that very namespace (netns.DoPath, a child process that joins it).
func FilePath(ns *os.File) string {
	return fmt.Sprintf("/proc/%d/fd/%d", os.Getpid(), ns.Fd())
}

// notHost refuses the network namespace path whose status is ns when it is the shim's own (the host's).
func notHost(path string, ns *unix.Stat_t) error {
	var self unix.Stat_t
	if err := unix.Stat("/proc/self/ns/net", &self); err != nil {
		return fmt.Errorf("the shim's network namespace: %w", err)
	}
	if ns.Dev == self.Dev && ns.Ino == self.Ino {
		return fmt.Errorf("%w: network namespace %s is the host's (host networking): a Kiln container runs in its own VM and cannot share the host's network; name a namespace of its own, or use runc for it", errdefs.ErrInvalidArgument, path)
	}
	return nil
}

// Interfaces names the interfaces of the network namespace ns that a mirror would take (see takes).
func Interfaces(ns *os.File) ([]string, error) {
	h, err := netlink.NewHandleAt(netns.NsHandle(int(ns.Fd())), unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("netlink in network namespace %s: %w", ns.Name(), err)
	}
	defer h.Close()
	links, err := netdump.Consistent(h.LinkList)
	if err != nil {
		return nil, fmt.Errorf("list the interfaces of network namespace %s: %w", ns.Name(), err)
	}
	var names []string
	for _, l := range links {
		if takes(l.Attrs()) {
			names = append(names, l.Attrs().Name)
		}
	}
	return names, nil
}

// takes says whether a mirror takes the interface: one that is up, other than the loopback (a new namespace's
// fallback tunnels, sit0 or tunl0 where their modules are loaded, are down) and a mirror's own taps.
func takes(a *netlink.LinkAttrs) bool {
	return a.Flags&net.FlagLoopback == 0 && a.Flags&net.FlagUp != 0 && !isTap(a.Name)
}
