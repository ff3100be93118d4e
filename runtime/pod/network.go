package pod

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
	"github.com/kiln-runtime/kiln/runtime/bundle"
	"github.com/kiln-runtime/kiln/runtime/hooks"
	"github.com/kiln-runtime/kiln/runtime/hostcgroup"
	"github.com/kiln-runtime/kiln/runtime/network"
	"github.com/kiln-runtime/kiln/runtime/portforward"
	"github.com/kiln-runtime/kiln/vm/qemu"
)

// MirrorFile, in a pod's share directory, records its network mirror for network.Unmirror.
const MirrorFile = "network.json"

// First is the container a pod is booted for.
type First struct {
	ID     string
	Bundle *bundle.Bundle
}

// hostNetwork is the host side of a pod's network, prepared for its first container before the guest reads it.
type hostNetwork struct {
	// path is the host network namespace the pod mirrors ("" for none); mirror holds its taps and holder a
	// process in it for hooks. hooksRun names the container whose create hooks ran before the VM booted.
	path     string
	mirror   *network.Mirror
	hooksRun string
	// ns is the namespace at path, opened as the mirror read it: the containers' stand-ins join it by descriptor,
	// so that a path naming another namespace later (a holder's pid reused) or none changes nothing.
	ns       *os.File
	holderMu sync.Mutex
	holder   *network.Holder
	// forwardPath is the host network namespace the first spec named, where containerd's port forwarding dials.
	forwardPath string
}

// holderMade says whether the namespace mirrored is one the holder made (the spec asked for a new one).
func (n *hostNetwork) holderMade() bool {
	n.holderMu.Lock()
	defer n.holderMu.Unlock()
	return n.holder != nil && n.path == n.holder.NSPath()
}

// Network is the host network a pod prepared for its first container, taken from a spare's pod that failed after
// that container's create hooks ran (Pod.TakeNetwork) to the pod booted for the container instead
// (Options.Network): the hooks ran once and must not run again. Close undoes one that no pod took.
type Network struct {
	first string
	net   *hostNetwork
	// cgroup is the host cgroup the spare's pod entered for the container, where the namespace holder runs: the
	// shim stays in it for the pod booted instead, which leaves it at its end.
	cgroup *hostcgroup.Group
}

// Close undoes the network unless a pod took it, and leaves its cgroup; a nil Network is nothing to undo.
func (n *Network) Close() error {
	if n == nil || n.net == nil {
		return nil
	}
	err := n.net.close()
	if n.cgroup != nil {
		err = errors.Join(err, n.cgroup.Leave())
	}
	n.net, n.cgroup = nil, nil
	return err
}

// take hands the network, and the cgroup the shim is in, to the pod booted for container id.
func (n *Network) take(id string) (*hostNetwork, *hostcgroup.Group, error) {
	if n.net == nil {
		return nil, nil, fmt.Errorf("the network prepared for container %s was taken already", n.first)
	}
	if n.first != id {
		return nil, nil, fmt.Errorf("the network prepared for container %s cannot serve container %s", n.first, id)
	}
	net, g := n.net, n.cgroup
	n.net, n.cgroup = nil, nil
	return net, g, nil
}

// ErrHook is returned by Adopt when one of the first container's create hooks failed: a pod booted for it
// would run them again, so the container fails, as it does when its own pod's boot runs them.
var ErrHook = errors.New("create hook failed")

// prepareNetwork decides the pod's network from its first container's spec, before the VM reads it: it starts a
// namespace holder when hooks need a pid, runs the prestart and createRuntime hooks, then mirrors the namespace's
// interfaces to taps for QEMU. What a spare's pod prepared before it failed (p.net, from Options.Network) is not
// done again.
func (p *Pod) prepareNetwork(ctx context.Context, first *First) ([]qemu.Net, error) {
	spec := first.Bundle.Spec
	n := p.net
	if n.hooksRun != first.ID {
		src, err := CheckSpec(p.cfg, first.ID, spec)
		if err != nil {
			return nil, err
		}
		if err := checkNotStandIn(src.Path); err != nil {
			return nil, Refuse(fmt.Errorf("container %s: %w", first.ID, err))
		}
		n.path = src.Path
		// Only a namespace the spec names is one containerd's port forwarding enters.
		n.forwardPath = src.Path
		if src.Path != "" && n.ns == nil {
			if n.ns, err = network.OpenNamespace(src.Path); err != nil {
				return nil, Refuse(fmt.Errorf("container %s: %w", first.ID, err))
			}
		}
		if hooks.Any(spec) {
			holderNS := src.Path
			if n.ns != nil {
				holderNS = network.FilePath(n.ns)
			}
			h, err := network.StartHolder(holderNS)
			if err != nil {
				return nil, err
			}
			n.holderMu.Lock()
			n.holder = h
			n.holderMu.Unlock()
			if src.New {
				n.path = h.NSPath()
			}
			// Run, failed or not, they are not run again for this container.
			n.hooksRun = first.ID
			if err := hooks.CreateRuntime(ctx, spec, p.hookState(first.ID, first.Bundle)); err != nil {
				return nil, fmt.Errorf("container %s: %w: %w", first.ID, ErrHook, err)
			}
		}
	}
	if n.path == "" {
		// A namespace of the pod's own that no hook configures has nothing to mirror.
		return nil, nil
	}
	// The record is kept beside the share's owner file: if the shim is killed, its `delete` command undoes the
	// mirror from it. Not for a namespace the holder made, which dies with it (and with QEMU's taps) when the shim
	// is killed: its path names the holder's pid, which a later process may have by the time `delete` reads it.
	record := filepath.Join(p.ShareDir(), MirrorFile)
	keep := !n.holderMade()
	if n.ns == nil {
		f, err := os.Open(n.path)
		if err != nil {
			return nil, fmt.Errorf("container %s: open network namespace: %w", first.ID, err)
		}
		n.ns = f
	}
	if n.mirror == nil {
		// Named before the first tap, so that a shim killed while it mirrors leaves what to undo.
		if keep {
			if err := network.SaveNamespace(record, n.ns, n.path); err != nil {
				return nil, err
			}
		}
		m, err := network.MirrorNamespace(n.ns, n.path, p.log)
		if err != nil {
			return nil, fmt.Errorf("container %s: %w", first.ID, err)
		}
		n.mirror = m
	}
	if keep {
		if err := n.mirror.Save(record); err != nil {
			return nil, err
		}
	}
	nets := make([]qemu.Net, 0, len(n.mirror.Interfaces))
	for _, ifc := range n.mirror.Interfaces {
		nets = append(nets, qemu.Net{Tap: ifc.Tap, MAC: ifc.MAC, MTU: ifc.MTU})
	}
	return nets, nil
}

// TakeNetwork takes from a pod whose Adopt failed what it prepared for that first container once its create
// hooks ran, so that the pod booted for the container instead does not run them again (Options.Network); nil
// when no hook ran, and nothing prepared need be kept. The host cgroup the pod entered for the container goes
// with it (the namespace holder runs there). Close then leaves both alone. Nothing else uses a pod whose Adopt
// failed, so nothing races the hand-over.
func (p *Pod) TakeNetwork() *Network {
	n := p.net
	if n.hooksRun == "" {
		return nil
	}
	p.cgroupMu.Lock()
	taken := &Network{first: n.hooksRun, net: n, cgroup: p.cgroup}
	p.net, p.cgroup = &hostNetwork{}, nil
	p.cgroupMu.Unlock()
	return taken
}

// configureGuestNetwork gives the guest what prepareNetwork found.
func (p *Pod) configureGuestNetwork(ctx context.Context) error {
	m := p.net.mirror
	if m == nil || len(m.Interfaces) == 0 && len(m.Routes) == 0 {
		return nil
	}
	req := &agentv1.ConfigureNetworkRequest{}
	for _, ifc := range m.Interfaces {
		req.Interfaces = append(req.Interfaces, &agentv1.Interface{
			Name: ifc.Name, Mac: ifc.MAC.String(), Mtu: uint32(ifc.MTU), Addresses: ifc.Addresses,
		})
	}
	for _, r := range m.Routes {
		req.Routes = append(req.Routes, &agentv1.Route{
			Destination: r.Destination, Gateway: r.Gateway, Device: r.Device, Source: r.Source,
			Family: uint32(r.Family), Scope: uint32(r.Scope), Metric: uint32(r.Metric), Mtu: uint32(r.MTU),
			Onlink: r.OnLink,
		})
	}
	for _, n := range m.Neighbours {
		req.Neighbours = append(req.Neighbours, &agentv1.Neighbour{Device: n.Device, Ip: n.IP, Mac: n.MAC})
	}
	if _, err := p.sb.Network().ConfigureNetwork(ctx, req); err != nil {
		return fmt.Errorf("configure the guest's network: %w", err)
	}
	return nil
}

// startPortForward lets containerd's port forwarding, which dials localhost in the pod's namespace on the host,
// reach the guest. A host that cannot attach the steering program (a kernel before 5.9, no BPF) runs the pod
// without port forwarding: it is logged, and `kiln check` reports it.
func (p *Pod) startPortForward() {
	if p.net.forwardPath == "" {
		return
	}
	path := p.net.forwardPath
	// The namespace the mirror took, not whatever the path names by now: a copy of its descriptor, which a
	// closing pod cannot take away meanwhile.
	p.bundlesMu.Lock()
	var ns *os.File
	var err error
	if p.net.ns != nil && path == p.net.path {
		ns, err = dupFile(p.net.ns)
	}
	p.bundlesMu.Unlock()
	if err != nil {
		p.log.WithError(err).Warn("the pod runs without port forwarding")
		return
	}
	if ns != nil {
		defer ns.Close()
		path = network.FilePath(ns)
	}
	f, err := portforward.Start(path, p.sb.Machine(), p.log)
	if err != nil {
		p.log.WithError(err).Warn("the pod runs without port forwarding")
		return
	}
	p.forward = f
}

// checkJoin refuses a container whose spec cannot join the pod: host networking, or a network namespace other
// than the pod's. CRI names the pod's as /proc/<sandbox pid>/ns/net, the pid of the sandbox's stand-in (which is
// in the pod's namespace).
func (p *Pod) checkJoin(id string, spec *specs.Spec) error {
	src, err := CheckSpec(p.cfg, id, spec)
	if err != nil {
		return err
	}
	if src.New || src.Path == p.net.path {
		return nil
	}
	if pid, ok := procNSPid(src.Path, "net"); ok && p.isContainerPid(uint32(pid)) {
		return nil
	}
	return Refuse(fmt.Errorf("%w: container %s: network namespace %s is not its pod's: containers of a Kiln pod share the network of the pod's VM (name the pod's namespace, or /proc/<pid of a container of the pod>/ns/net)", errdefs.ErrInvalidArgument, id, src.Path))
}

// hookState is the state a container's hooks get: the pid is the namespace holder's, a host process in the
// pod's network namespace.
func (p *Pod) hookState(id string, b *bundle.Bundle) hooks.State {
	st := hooks.State{ID: id, Bundle: b.Dir, Annotations: b.Spec.Annotations}
	n := p.net
	n.holderMu.Lock()
	if n.holder != nil {
		st.Pid = n.holder.Pid()
	}
	n.holderMu.Unlock()
	return st
}

// ensureHolder starts the pod's namespace holder for a container's hooks when the first container had none: in
// the pod's namespace, or, for a pod whose first container named none and had no hooks, in the one its stand-ins
// share (standIns.own), which is the namespace a client finds at /proc/<task pid>/ns/net; in a new one only when
// there is neither.
func (p *Pod) ensureHolder() error {
	n := p.net
	path := n.path
	// Through a copy of a descriptor, so that the pod's close or the stand-ins' last end cannot close it under the
	// holder's start: the namespace the pod opened (not whatever its path names by now), else the stand-ins'.
	p.bundlesMu.Lock()
	var ns *os.File
	var err error
	switch {
	case path != "" && n.ns != nil:
		ns, err = dupFile(n.ns)
	case path == "" && p.standIns.own != nil:
		ns, err = dupFile(p.standIns.own)
	}
	p.bundlesMu.Unlock()
	if err != nil {
		return fmt.Errorf("the pod's network namespace: %w", err)
	}
	if ns != nil {
		defer ns.Close()
		path = network.FilePath(ns)
	}
	n.holderMu.Lock()
	defer n.holderMu.Unlock()
	if n.holder != nil {
		return nil
	}
	h, err := network.StartHolder(path)
	if err != nil {
		return err
	}
	n.holder = h
	return nil
}

// dupFile is a new descriptor of f's open file, closed on exec.
func dupFile(f *os.File) (*os.File, error) {
	fd, err := unix.FcntlInt(f.Fd(), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	return os.NewFile(uintptr(fd), f.Name()), nil
}

// closeNetwork undoes prepareNetwork and startPortForward once QEMU is gone.
func (p *Pod) closeNetwork() error {
	if p.forward != nil {
		// Closed already by Close, before the guest stopped; this covers a failed boot.
		_ = p.forward.Close()
	}
	// Under bundlesMu, which startStandIn and CheckLateNetwork hold while they use the descriptor.
	p.bundlesMu.Lock()
	ns := p.net.ns
	p.net.ns = nil
	p.bundlesMu.Unlock()
	if ns != nil {
		_ = ns.Close()
	}
	return p.net.close()
}

// close undoes the mirror and stops the holder.
func (n *hostNetwork) close() error {
	var err error
	if n.mirror != nil {
		err = n.mirror.Close()
	}
	if n.ns != nil {
		_ = n.ns.Close()
		n.ns = nil
	}
	n.holderMu.Lock()
	if n.holder != nil {
		n.holder.Close()
	}
	n.holderMu.Unlock()
	return err
}

// checkNotStandIn refuses, for a pod's first container, a network namespace named by a thread's task id:
// another Kiln container's, whose pid is its stand-in's (`nerdctl run --network container:<a Kiln container>`).
// Two VMs cannot share one network stack, and a stand-in's namespace is the host's again once its container is
// gone. Any thread's is refused: a namespace of a process is named by its pid.
func checkNotStandIn(path string) error {
	tid, ok := procNSPid(path, "net")
	if !ok {
		return nil
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", tid))
	if err != nil {
		return nil // gone: mirroring it fails, naming it
	}
	for _, line := range strings.Split(string(b), "\n") {
		if tgid, ok := strings.CutPrefix(line, "Tgid:"); ok && strings.TrimSpace(tgid) != strconv.Itoa(tid) {
			return fmt.Errorf("%w: network namespace %s is a thread's, such as another Kiln container's (its pid is a thread of its shim): containers in different Kiln VMs cannot share a network namespace; run them in one pod, or give this one a namespace of its own",
				errdefs.ErrInvalidArgument, path)
		}
	}
	return nil
}
