package pod

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"time"

	"github.com/containerd/containerd/v2/contrib/seccomp"
	"github.com/containerd/containerd/v2/core/containers"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/oci"
	"golang.org/x/sys/unix"

	"github.com/kiln-runtime/kiln/config"
	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
	"github.com/kiln-runtime/kiln/runtime/bundle"
	"github.com/kiln-runtime/kiln/runtime/container"
	"github.com/kiln-runtime/kiln/runtime/stdio"
	"github.com/kiln-runtime/kiln/vm/qemu"
)

// ErrUnfit is returned by Adopt for a first container whose pod a spare's cannot be.
var ErrUnfit = errors.New("the spare's pod does not fit")

// warmID is the warm-up container's id.
const warmID = "kiln-warm"

// warmSuffix follows the pod's id in the name of its warm-up's bundle directory, in the state directory; sweep
// removes one whose pod is gone.
const warmSuffix = ".warm-"

// Warm runs one throwaway container in the guest and removes it, so that the guest (and, under TCG, its QEMU,
// which translates guest code the first time it runs) has been through a container's whole path before a task's
// first container comes: a spare's pod. The container is containerd's default one with the runtime's default
// seccomp profile and a read-only root, as CRI's pause container has (the guest layers such a root); its program
// is the agent's own binary, which exits at once (agentv1.WarmExitEnv). A VM with hot-plug then rehearses a pod's
// network on a throwaway NIC.
func (p *Pod) Warm(ctx context.Context) (WarmUp, error) {
	start := time.Now()
	dir, err := os.MkdirTemp(p.cfg.Runtime.StateDir, p.id+warmSuffix)
	if err != nil {
		return WarmUp{}, fmt.Errorf("warm pod %s: %w", p.id, err)
	}
	defer os.RemoveAll(dir)
	if err := os.Mkdir(filepath.Join(dir, "rootfs"), 0o755); err != nil {
		return WarmUp{}, fmt.Errorf("warm pod %s: %w", p.id, err)
	}
	spec, err := oci.GenerateSpec(namespaces.WithNamespace(ctx, "kiln"), nil, &containers.Container{ID: warmID},
		oci.WithRootFSPath("rootfs"), oci.WithRootFSReadonly(), oci.WithProcessArgs("/proc/self/exe"), oci.WithEnv([]string{agentv1.WarmExitEnv + "=1"}),
		seccomp.WithDefaultProfile())
	if err != nil {
		return WarmUp{}, fmt.Errorf("warm pod %s: spec: %w", p.id, err)
	}
	raw, err := json.Marshal(spec)
	if err != nil {
		return WarmUp{}, fmt.Errorf("warm pod %s: spec: %w", p.id, err)
	}
	if err := os.WriteFile(filepath.Join(dir, "config.json"), raw, 0o600); err != nil {
		return WarmUp{}, fmt.Errorf("warm pod %s: %w", p.id, err)
	}
	b, err := bundle.Load(dir)
	if err != nil {
		return WarmUp{}, fmt.Errorf("warm pod %s: %w", p.id, err)
	}
	c, err := p.CreateContainer(ctx, ContainerOptions{ID: warmID, Bundle: b, IO: stdio.IO{}})
	if err != nil {
		return WarmUp{}, fmt.Errorf("warm pod %s: %w", p.id, err)
	}
	err = c.Start(ctx)
	if err == nil {
		// The program exits at once; a guest that hangs instead would keep the spare, and the boot turn it
		// holds, for good. Its wait is bounded like a request to the agent.
		wctx, cancel := context.WithTimeout(ctx, time.Duration(p.cfg.Agent.RequestTimeout))
		var exit container.Exit
		exit, err = c.Wait(wctx)
		cancel()
		if err == nil && exit.Status != 0 {
			err = fmt.Errorf("warm-up container exited with status %d", exit.Status)
		}
	}
	if _, derr := p.DeleteContainer(ctx, c, true); derr != nil && err == nil {
		err = derr
	}
	if err != nil {
		return WarmUp{}, fmt.Errorf("warm pod %s: %w", p.id, err)
	}
	w := WarmUp{Container: time.Since(start)}
	start = time.Now()
	if w.NetworkRehearsed, err = p.rehearseNetwork(ctx); err != nil {
		return WarmUp{}, fmt.Errorf("warm pod %s: %w", p.id, err)
	}
	if w.NetworkRehearsed {
		w.Network = time.Since(start)
	}
	return w, nil
}

// WarmUp is what Warm did, and how long each part took.
type WarmUp struct {
	// Container is how long the throwaway container took, from its create to its removal.
	Container time.Duration
	// NetworkRehearsed says the guest configured a throwaway NIC, hot-plugged and unplugged again.
	NetworkRehearsed bool
	// Network is how long that took; zero when NetworkRehearsed is false.
	Network time.Duration
}

// rehearsal is the network a spare's warm-up configures on its throwaway NIC: what a CNI plugin gives a pod, in
// the documentation ranges, in a guest namespace that is deleted afterwards.
func rehearsal(mac net.HardwareAddr) *agentv1.ConfigureNetworkRequest {
	return &agentv1.ConfigureNetworkRequest{
		Interfaces: []*agentv1.Interface{{Name: "eth0", Mac: mac.String(), Mtu: rehearsalMTU, Addresses: []string{"192.0.2.2/24", "2001:db8::2/64"}}},
		Routes: []*agentv1.Route{
			{Gateway: "192.0.2.1", Device: "eth0", Family: 4},
			{Gateway: "2001:db8::1", Device: "eth0", Family: 6},
		},
		Neighbours: []*agentv1.Neighbour{{Device: "eth0", Ip: "192.0.2.1", Mac: "02:00:5e:00:02:01"}},
	}
}

// rehearsalMTU is the throwaway NIC's MTU, offered to the guest's driver as a pod's NIC's is.
const rehearsalMTU = 1500

// rehearseNetwork has the guest configure a throwaway NIC as it would a pod's network, and unplugs it
// (qemu.Machine.RehearseNIC): the steps between a spare's adoption by a pod with a network and its first
// container, hot-plug and configuration, then find the guest's paths translated. A VM without hot-plug (booted
// cold when its template failed) takes no pod with a network, and has nothing to rehearse: false.
func (p *Pod) rehearseNetwork(ctx context.Context) (bool, error) {
	m, ok := p.sb.Machine().(hotplugger)
	if !ok || !m.Hotplug() {
		return false, nil
	}
	mac := make(net.HardwareAddr, 6)
	if _, err := rand.Read(mac); err != nil {
		return false, fmt.Errorf("rehearse the network: %w", err)
	}
	// Unicast and locally administered.
	mac[0] = mac[0]&^0x01 | 0x02
	err := m.RehearseNIC(ctx, mac, rehearsalMTU, func(ctx context.Context) error {
		_, err := p.sb.Network().RehearseNetwork(ctx, rehearsal(mac))
		return err
	})
	if err != nil {
		return false, fmt.Errorf("rehearse the network: %w", err)
	}
	return true, nil
}

// hotplugger is a running VM that may take NICs, when Hotplug says so (qemu.Machine restored from a template).
type hotplugger interface {
	Hotplug() bool
	PlugNets(ctx context.Context, nets []qemu.Net) error
	RehearseNIC(ctx context.Context, mac net.HardwareAddr, mtu int, guest func(context.Context) error) error
}

// Refuses says why first's pod, of base (the Kiln configuration, before sizing), cannot be this spare's pod: it
// asks for another size. A VM that can grow serves a pod that needs more memory or vCPUs than it booted with, up
// to what QEMU gave it (sameMachine). It touches nothing; nil means Adopt may take it.
func (p *Pod) Refuses(base config.Config, first *First) error {
	_, err := p.refuses(base, first)
	return err
}

func (p *Pod) refuses(base config.Config, first *First) (config.Config, error) {
	sized, err := Size(base, first)
	if err != nil {
		return config.Config{}, err
	}
	if !sameMachine(sized, p.cfg) {
		return config.Config{}, fmt.Errorf("%w: container %s asks for another VM size", ErrUnfit, first.ID)
	}
	return sized, nil
}

// sameMachine says whether a pod of configuration want can run in a VM booted for have: the same configuration
// but for the memory and vCPUs a VM that can grow adds once it runs, which must boot the same guest on the same
// machine (config.Hypervisor.MemoryLayout and CPULayout).
func sameMachine(want, have config.Config) bool {
	w, h := &want.Hypervisor, &have.Hypervisor
	wb, wr := w.MemoryLayout()
	hb, hr := h.MemoryLayout()
	wc, wm := w.CPULayout()
	hc, hm := h.CPULayout()
	if wb != hb || wr != hr || wc != hc || wm != hm {
		return false
	}
	// A VM that cannot grow has its size from the start (the layouts are its size, equal now).
	takeSize(w, *h)
	return reflect.DeepEqual(want, have)
}

// takeSize gives h the pod's size of from: the memory and vCPUs it has, and those it booted with, which a VM
// that can grow (sameMachine) adds the difference of once it runs.
func takeSize(h *config.Hypervisor, from config.Hypervisor) {
	h.MemoryMiB, h.BootMemoryMiB, h.VCPUs, h.BootVCPUs = from.MemoryMiB, from.BootMemoryMiB, from.VCPUs, from.BootVCPUs
}

// Adopt makes a pod booted without a first container (a spare's) the pod of first, as a pod of base (the Kiln
// configuration, before sizing) would be. It refuses with ErrUnfit what Refuses refuses. Otherwise it
// does what New does for a first container: the pod's host processes (the shim, QEMU, virtiofsd) move into the
// host cgroup first's spec names, and the network namespace first names is mirrored into the guest, its taps
// hot-plugged into the running VM. On error the caller closes the pod, which undoes both, and boots one for
// first instead, taking over with TakeNetwork what first's create hooks prepared: they run once. A failed hook is
// ErrHook, first's own failure, which a pod booted for it would repeat.
func (p *Pod) Adopt(ctx context.Context, base config.Config, first *First) error {
	sized, err := p.refuses(base, first)
	if err != nil {
		return err
	}
	// The VM may have ended while it waited (its QEMU killed, by the host's OOM killer among others), or its
	// guest hung: a task in it would fail. A hung guest would not answer Close's shutdown request either: its VM
	// is stopped now, as an unresponsive pod's is.
	if err := p.sb.Check(ctx, spareCheckTimeout); err != nil {
		p.stopUnresponsive(err)
		return fmt.Errorf("%w: %v", ErrUnfit, err)
	}
	if err := p.sb.Reseed(ctx); err != nil {
		return fmt.Errorf("%w: %v", ErrUnfit, err)
	}
	// The pod's memory and vCPUs beyond what the spare booted with (sameMachine).
	p.growMu.Lock()
	takeSize(&p.cfg.Hypervisor, sized.Hypervisor)
	p.growMu.Unlock()
	if err := p.grow(ctx); err != nil {
		return fmt.Errorf("%w: %v", ErrUnfit, err)
	}
	if err := p.enterCgroup(first, p.VMProcesses()...); err != nil {
		return err
	}
	nets, err := p.prepareNetwork(ctx, first)
	if err != nil {
		return err
	}
	if len(nets) > 0 {
		m, ok := p.sb.Machine().(hotplugger)
		if !ok || !m.Hotplug() {
			return fmt.Errorf("%w: its VM cannot take NICs once running", ErrUnfit)
		}
		if err := m.PlugNets(ctx, nets); err != nil {
			return fmt.Errorf("%w: %v", ErrUnfit, err)
		}
	}
	if err := p.configureGuestNetwork(ctx); err != nil {
		return fmt.Errorf("adopt pod %s: %w", p.id, err)
	}
	p.startPortForward()
	p.followClock()
	return nil
}

// spareCheckTimeout bounds Adopt's health check of the spare's agent, which answers in milliseconds when it is
// alive: a hung guest costs its task that long before a VM boots for it.
const spareCheckTimeout = 2 * time.Second

// VMProcesses are the host processes of the pod's VM (QEMU, virtiofsd), each the leader of its process group:
// whatever they start is in it. Empty for a VM that does not tell them.
func (p *Pod) VMProcesses() []int {
	if m, ok := p.sb.Machine().(processOwner); ok {
		return m.Processes()
	}
	return nil
}

// processOwner is a VM that tells its host processes (qemu.Machine).
type processOwner interface{ Processes() []int }

// Foreground puts the pod's VM at the host's usual CPU priority, for a spare's pod (Options.Background) that a task
// takes: its processes at nice 0 (the spare's priority, which they inherited) and its cgroup beside the others.
func (p *Pod) Foreground() error {
	var errs []error
	for _, group := range p.VMProcesses() {
		if err := unix.Setpriority(unix.PRIO_PGRP, group, 0); err != nil {
			errs = append(errs, fmt.Errorf("restore the priority of process group %d: %w", group, err))
		}
	}
	if m, ok := p.sb.Machine().(foregrounder); ok {
		errs = append(errs, m.Foreground())
	}
	return errors.Join(errs...)
}

// foregrounder is a VM that can leave the background it started in (qemu.Machine).
type foregrounder interface{ Foreground() error }
