// Package network is the guest side of a pod's network: the one network namespace every container of the pod
// joins, and the interfaces, routes and neighbours the host read from the pod's network namespace on the host.
// The interfaces arrive as virtio-net devices carrying the host interfaces' MACs; the agent finds them by MAC,
// moves them into the pod namespace and gives them the host's names, MTUs and addresses, through netlink.
//
// The pod namespace is not the guest's root namespace: runc's libcontainer refuses net.* sysctls for a container
// that shares the namespace of the runtime itself, and the agent's own sockets stay out of the pod's reach.
package network

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/sirupsen/logrus"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	knetns "github.com/kiln-runtime/kiln/netns"
	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
)

// Pod is the guest's pod network namespace. Its zero value is not usable: use New.
type Pod struct {
	path string
	log  *logrus.Entry

	prepare sync.Once

	mu         sync.Mutex
	created    bool
	configured bool
	// sysfs says Sysfs mounted the pod's sysfs.
	sysfs bool
}

// New describes the pod namespace the agent keeps at path (a file it bind-mounts the namespace on); nothing is
// created until Path or ConfigureNetwork needs it.
func New(path string, log *logrus.Entry) *Pod {
	return &Pod{path: path, log: log}
}

// Path is the pod namespace's file, which containers name as their network namespace; the namespace is created,
// with its loopback up, on first use.
func (p *Pod) Path() (string, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if err := p.ensure(); err != nil {
		return "", err
	}
	return p.path, nil
}

// Prepare creates the pod namespace in the background, so that ConfigureNetwork or the first container finds it
// made: under emulation its creation is some tens of milliseconds of the guest kernel's work, which can run on
// another vCPU while the host is still setting the guest up. Calls after the first do nothing. A failure is only
// logged: Path and ConfigureNetwork try again and return the error.
func (p *Pod) Prepare() {
	p.prepare.Do(func() {
		go func() {
			if _, err := p.Path(); err != nil {
				p.log.WithError(err).Warn("prepare the pod network namespace")
			}
		}()
	})
}

func (p *Pod) ensure() error {
	if p.created {
		return nil
	}
	if err := create(p.path); err != nil {
		return fmt.Errorf("create pod network namespace %s: %w", p.path, err)
	}
	if err := p.loopbackUp(); err != nil {
		// Undone, so that the next try does not find the path taken (create refuses an existing file).
		if rerr := remove(p.path); rerr != nil {
			err = errors.Join(err, fmt.Errorf("delete network namespace %s: %w", p.path, rerr))
		}
		return err
	}
	p.created = true
	return nil
}

func (p *Pod) loopbackUp() error {
	h, err := p.handle()
	if err != nil {
		return err
	}
	defer h.Close()
	return LoopbackUp(h)
}

func (p *Pod) handle() (*netlink.Handle, error) {
	ns, err := netns.GetFromPath(p.path)
	if err != nil {
		return nil, fmt.Errorf("open pod network namespace %s: %w", p.path, err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns, unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("netlink in pod network namespace: %w", err)
	}
	return h, nil
}

// create makes a new network namespace and bind-mounts it on path.
func create(path string) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return err
	}
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_RDONLY, 0o400)
	if err != nil {
		return err
	}
	_ = f.Close()
	err = knetns.DoNew(func(ns string) error {
		if err := unix.Mount(ns, path, "", unix.MS_BIND, ""); err != nil {
			return fmt.Errorf("bind %s: %w", ns, err)
		}
		return nil
	})
	if err != nil {
		// The bind may have been made before the thread failed to come back.
		_ = unix.Unmount(path, unix.MNT_DETACH)
		_ = os.Remove(path)
		return err
	}
	return nil
}

// LoopbackUp brings up lo in the namespace h works in.
func LoopbackUp(h *netlink.Handle) error {
	lo, err := h.LinkByName("lo")
	if err != nil {
		return fmt.Errorf("find lo: %w", err)
	}
	if err := h.LinkSetUp(lo); err != nil {
		return fmt.Errorf("bring lo up: %w", err)
	}
	return nil
}

// ConfigureNetwork implements agentv1.NetworkService: it gives the pod namespace the request's interfaces,
// routes and neighbours. It is called once per pod.
func (p *Pod) ConfigureNetwork(ctx context.Context, req *agentv1.ConfigureNetworkRequest) (*agentv1.ConfigureNetworkResponse, error) {
	set, err := parseRequest(req)
	if err != nil {
		return nil, fmt.Errorf("configure network: %w", err)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.configured {
		return nil, errors.New("configure network: the pod's network is already configured")
	}
	if err := p.ensure(); err != nil {
		return nil, fmt.Errorf("configure network: %w", err)
	}
	if err := p.configure(ctx, set); err != nil {
		return nil, fmt.Errorf("configure network: %w", err)
	}
	p.configured = true
	return &agentv1.ConfigureNetworkResponse{}, nil
}

// RehearseNetwork implements agentv1.NetworkService: it configures the request as ConfigureNetwork would, in a
// namespace of its own beside the pod's, then deletes that namespace, whose interfaces go back to the guest's
// root namespace for the host to unplug. The pod's namespace is not touched. A spare's warm-up sends it for a
// throwaway NIC: under TCG the pod's own NICs then find the guest's hot-plug, virtio-net and netlink paths
// translated. Once the pod's network is configured there is nothing left to rehearse, and it is refused.
func (p *Pod) RehearseNetwork(ctx context.Context, req *agentv1.ConfigureNetworkRequest) (*agentv1.ConfigureNetworkResponse, error) {
	set, err := parseRequest(req)
	if err != nil {
		return nil, fmt.Errorf("rehearse network: %w", err)
	}
	// Held throughout: the rehearsal renames devices in the root namespace as the pod's configuration does.
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.configured {
		return nil, errors.New("rehearse network: the pod's network is configured already")
	}
	stage := &Pod{path: p.path + ".rehearsal", log: p.log.WithField("rehearsal", true)}
	if err := stage.ensure(); err != nil {
		return nil, fmt.Errorf("rehearse network: %w", err)
	}
	err = stage.configure(ctx, set)
	if rerr := remove(stage.path); rerr != nil {
		err = errors.Join(err, fmt.Errorf("delete network namespace %s: %w", stage.path, rerr))
	}
	if err != nil {
		return nil, fmt.Errorf("rehearse network: %w", err)
	}
	return &agentv1.ConfigureNetworkResponse{}, nil
}

// remove unbinds the namespace create bound on path, and removes the file. The kernel deletes the namespace once
// nothing holds it, moving its devices back to the root namespace.
func remove(path string) error {
	if err := unix.Unmount(path, unix.MNT_DETACH); err != nil {
		return err
	}
	return os.Remove(path)
}

func (p *Pod) configure(ctx context.Context, set *setup) error {
	root, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return fmt.Errorf("netlink in the guest's namespace: %w", err)
	}
	defer root.Close()
	h, err := p.handle()
	if err != nil {
		return err
	}
	defer h.Close()
	ns, err := netns.GetFromPath(p.path)
	if err != nil {
		return fmt.Errorf("open pod network namespace: %w", err)
	}
	defer ns.Close()

	// A device the guest already calls by the name it wants (its one NIC, eth0, for most pods) moves under that
	// name: the pod namespace held only lo, and every other device moves under a temporary name first, so that one
	// taking another's final name (the guest calls its first device eth0, the host's eth0 may be the second) never
	// collides. A rename is not free: under TCG each cost the guest 10-20 ms of its kernel's work.
	type moved struct {
		want *ifaceSetup
		name string
	}
	var links []moved
	start := time.Now()
	for i := range set.interfaces {
		want := &set.interfaces[i]
		link, err := waitForMAC(ctx, root, want.mac)
		if err != nil {
			return fmt.Errorf("interface %s: %w", want.name, err)
		}
		if i == 0 {
			p.log.WithField("waited", time.Since(start)).Debug("first network device found")
		}
		if err := root.LinkSetDown(link); err != nil {
			return fmt.Errorf("interface %s: set down: %w", want.name, err)
		}
		name := link.Attrs().Name
		if name != want.name {
			name = fmt.Sprintf("kiln%d", i)
			if err := root.LinkSetName(link, name); err != nil {
				return fmt.Errorf("interface %s: rename: %w", want.name, err)
			}
		}
		if err := root.LinkSetNsFd(link, int(ns)); err != nil {
			return fmt.Errorf("interface %s: move to pod namespace: %w", want.name, err)
		}
		links = append(links, moved{want: want, name: name})
	}
	for _, m := range links {
		if err := setUp(h, m.name, m.want); err != nil {
			return fmt.Errorf("interface %s: %w", m.want.name, err)
		}
	}
	for _, r := range set.routes {
		if err := addRoute(h, r); err != nil {
			return err
		}
	}
	for _, n := range set.neighbours {
		if err := addNeighbour(h, n); err != nil {
			return err
		}
	}
	p.log.WithFields(logrus.Fields{"interfaces": len(links), "took": time.Since(start)}).Debug("pod network configured")
	return nil
}

func setUp(h *netlink.Handle, name string, want *ifaceSetup) error {
	link, err := h.LinkByName(name)
	if err != nil {
		return fmt.Errorf("find moved device %s: %w", name, err)
	}
	if name != want.name {
		if err := h.LinkSetName(link, want.name); err != nil {
			return fmt.Errorf("rename %s: %w", name, err)
		}
	}
	if want.mtu > 0 {
		if err := h.LinkSetMTU(link, want.mtu); err != nil {
			return fmt.Errorf("set MTU %d: %w", want.mtu, err)
		}
	}
	for _, addr := range want.addrs {
		// No duplicate address detection: the host already owns the address, and a tentative IPv6 address
		// would make the pod's first seconds fail to bind or route.
		addr.Flags |= unix.IFA_F_NODAD
		if err := h.AddrAdd(link, addr); err != nil {
			return fmt.Errorf("add address %s: %w", addr.IPNet, err)
		}
	}
	if err := h.LinkSetUp(link); err != nil {
		return fmt.Errorf("bring up: %w", err)
	}
	return nil
}

func addRoute(h *netlink.Handle, r routeSetup) error {
	route := r.route
	if r.device != "" {
		link, err := h.LinkByName(r.device)
		if err != nil {
			return fmt.Errorf("route to %q: device %s: %w", r.dest, r.device, err)
		}
		route.LinkIndex = link.Attrs().Index
	}
	if err := h.RouteReplace(&route); err != nil {
		return fmt.Errorf("add route %s: %w", &route, err)
	}
	return nil
}

func addNeighbour(h *netlink.Handle, n neighbourSetup) error {
	link, err := h.LinkByName(n.device)
	if err != nil {
		return fmt.Errorf("neighbour %s: device %s: %w", n.neigh.IP, n.device, err)
	}
	neigh := n.neigh
	neigh.LinkIndex = link.Attrs().Index
	if err := h.NeighSet(&neigh); err != nil {
		return fmt.Errorf("add neighbour %s: %w", n.neigh.IP, err)
	}
	return nil
}
