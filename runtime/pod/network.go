package pod

import (
	"context"
	"fmt"
	"path/filepath"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
	"github.com/kiln-runtime/kiln/runtime/bundle"
	"github.com/kiln-runtime/kiln/runtime/hooks"
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

// prepareNetwork decides the pod's network from its first container's spec, before the VM exists: it starts a
// namespace holder when hooks need a pid, runs the prestart and createRuntime hooks, then mirrors the namespace's
// interfaces to taps for QEMU.
func (p *Pod) prepareNetwork(ctx context.Context, first *First) ([]qemu.Net, error) {
	spec := first.Bundle.Spec
	if err := hooks.Check(spec); err != nil {
		return nil, fmt.Errorf("container %s: %w", first.ID, err)
	}
	src, err := network.SourceOf(spec)
	if err != nil {
		return nil, fmt.Errorf("container %s: %w", first.ID, err)
	}
	p.netPath = src.Path
	// Only a namespace the spec names is one containerd's port forwarding enters.
	p.forwardPath = src.Path
	if hooks.Any(spec) {
		h, err := network.StartHolder(src.Path)
		if err != nil {
			return nil, err
		}
		p.holderMu.Lock()
		p.holder = h
		p.holderMu.Unlock()
		if src.New {
			p.netPath = h.NSPath()
		}
		if err := hooks.CreateRuntime(ctx, spec, p.hookState(first.ID, first.Bundle)); err != nil {
			return nil, fmt.Errorf("container %s: %w", first.ID, err)
		}
		p.hooksRun = first.ID
	}
	if p.netPath == "" {
		// A namespace of the pod's own that no hook configures has nothing to mirror.
		return nil, nil
	}
	m, err := network.MirrorNamespace(p.netPath, p.log)
	if err != nil {
		return nil, fmt.Errorf("container %s: %w", first.ID, err)
	}
	p.mirror = m
	// Kept beside the share's owner file: if the shim is killed, its `delete` command undoes the mirror from it.
	if err := m.Save(filepath.Join(p.ShareDir(), MirrorFile)); err != nil {
		return nil, err
	}
	nets := make([]qemu.Net, 0, len(m.Interfaces))
	for _, ifc := range m.Interfaces {
		nets = append(nets, qemu.Net{Tap: ifc.Tap, MAC: ifc.MAC, MTU: ifc.MTU})
	}
	return nets, nil
}

// configureGuestNetwork gives the guest what prepareNetwork found.
func (p *Pod) configureGuestNetwork(ctx context.Context) error {
	m := p.mirror
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
	if p.forwardPath == "" {
		return
	}
	f, err := portforward.Start(p.forwardPath, p.sb.Machine(), p.log)
	if err != nil {
		p.log.WithError(err).Warn("the pod runs without port forwarding")
		return
	}
	p.forward = f
}

// checkJoin refuses a container whose spec cannot join the pod: host networking, or a network namespace other
// than the pod's. CRI names the pod's as /proc/<sandbox pid>/ns/net with the guest pid Kiln reported; that path
// means nothing on the host and is never opened there.
func (p *Pod) checkJoin(id string, spec *specs.Spec) error {
	if err := hooks.Check(spec); err != nil {
		return fmt.Errorf("container %s: %w", id, err)
	}
	src, err := network.SourceOf(spec)
	if err != nil {
		return fmt.Errorf("container %s: %w", id, err)
	}
	if src.New || src.Path == p.netPath {
		return nil
	}
	if pid, ok := procNSPid(src.Path, "net"); ok && p.ctrs.IsInitPid(uint32(pid)) {
		return nil
	}
	return fmt.Errorf("%w: container %s: network namespace %s is not its pod's: containers of a Kiln pod share the network of the pod's VM (name the pod's namespace, or /proc/<pid of a container of the pod>/ns/net)", errdefs.ErrInvalidArgument, id, src.Path)
}

// hookState is the state a container's hooks get: the pid is the namespace holder's, a host process in the
// pod's network namespace.
func (p *Pod) hookState(id string, b *bundle.Bundle) hooks.State {
	st := hooks.State{ID: id, Bundle: b.Dir, Annotations: b.Spec.Annotations}
	p.holderMu.Lock()
	if p.holder != nil {
		st.Pid = p.holder.Pid()
	}
	p.holderMu.Unlock()
	return st
}

// ensureHolder starts the pod's namespace holder for a container's hooks when the first container had none.
func (p *Pod) ensureHolder() error {
	p.holderMu.Lock()
	defer p.holderMu.Unlock()
	if p.holder != nil {
		return nil
	}
	h, err := network.StartHolder(p.netPath)
	if err != nil {
		return err
	}
	p.holder = h
	return nil
}

// closeNetwork undoes prepareNetwork and startPortForward once QEMU is gone.
func (p *Pod) closeNetwork() error {
	var err error
	if p.forward != nil {
		// Closed already by Close, before the guest stopped; this covers a failed boot.
		_ = p.forward.Close()
	}
	if p.mirror != nil {
		err = p.mirror.Close()
	}
	p.holderMu.Lock()
	if p.holder != nil {
		p.holder.Close()
	}
	p.holderMu.Unlock()
	return err
}
