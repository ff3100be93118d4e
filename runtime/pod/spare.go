package pod

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"time"

	"github.com/containerd/containerd/v2/contrib/seccomp"
	"github.com/containerd/containerd/v2/core/containers"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/oci"

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

// Warm runs one throwaway container in the guest and removes it, so that the guest (and, under TCG, its QEMU,
// which translates guest code the first time it runs) has been through a container's whole path before a task's
// first container comes: a spare's pod. The container is containerd's default one with the runtime's default
// seccomp profile; its program is the agent's own binary, which exits at once (agentv1.WarmExitEnv).
func (p *Pod) Warm(ctx context.Context) error {
	dir, err := os.MkdirTemp(p.cfg.Runtime.StateDir, p.id+".warm-")
	if err != nil {
		return fmt.Errorf("warm pod %s: %w", p.id, err)
	}
	defer os.RemoveAll(dir)
	if err := os.Mkdir(filepath.Join(dir, "rootfs"), 0o755); err != nil {
		return fmt.Errorf("warm pod %s: %w", p.id, err)
	}
	spec, err := oci.GenerateSpec(namespaces.WithNamespace(ctx, "kiln"), nil, &containers.Container{ID: warmID},
		oci.WithRootFSPath("rootfs"), oci.WithProcessArgs("/proc/self/exe"), oci.WithEnv([]string{agentv1.WarmExitEnv + "=1"}),
		seccomp.WithDefaultProfile())
	if err != nil {
		return fmt.Errorf("warm pod %s: spec: %w", p.id, err)
	}
	raw, err := json.Marshal(spec)
	if err != nil {
		return fmt.Errorf("warm pod %s: spec: %w", p.id, err)
	}
	if err := os.WriteFile(filepath.Join(dir, "config.json"), raw, 0o600); err != nil {
		return fmt.Errorf("warm pod %s: %w", p.id, err)
	}
	b, err := bundle.Load(dir)
	if err != nil {
		return fmt.Errorf("warm pod %s: %w", p.id, err)
	}
	c, err := p.CreateContainer(ctx, ContainerOptions{ID: warmID, Bundle: b, IO: stdio.IO{}})
	if err != nil {
		return fmt.Errorf("warm pod %s: %w", p.id, err)
	}
	err = c.Start(ctx)
	if err == nil {
		var exit container.Exit
		if exit, err = c.Wait(ctx); err == nil && exit.Status != 0 {
			err = fmt.Errorf("warm-up container exited with status %d", exit.Status)
		}
	}
	if _, derr := p.DeleteContainer(ctx, c, true); derr != nil && err == nil {
		err = derr
	}
	if err != nil {
		return fmt.Errorf("warm pod %s: %w", p.id, err)
	}
	return nil
}

// Refuses says why first's pod, of base (the Kiln configuration, before sizing), cannot be this spare's pod: it
// asks for another size. It touches nothing; nil means Adopt may take it.
func (p *Pod) Refuses(base config.Config, first *First) error {
	sized, err := Size(base, first)
	if err != nil {
		return err
	}
	if !reflect.DeepEqual(sized, p.cfg) {
		return fmt.Errorf("%w: container %s asks for another VM size", ErrUnfit, first.ID)
	}
	return nil
}

// Adopt makes a pod booted without a first container (a spare's) the pod of first, as a pod of base (the Kiln
// configuration, before sizing) would be. It refuses with ErrUnfit what Refuses refuses. Otherwise it
// does what New does for a first container: the pod's host processes (the shim, QEMU, virtiofsd) move into the
// host cgroup first's spec names, and the network namespace first names is mirrored into the guest, its taps
// hot-plugged into the running VM. On error the caller closes the pod, which undoes both, and boots one for
// first instead, taking over with TakeNetwork what first's create hooks prepared: they run once. A failed hook is
// ErrHook, first's own failure, which a pod booted for it would repeat.
func (p *Pod) Adopt(ctx context.Context, base config.Config, first *First) error {
	if err := p.Refuses(base, first); err != nil {
		return err
	}
	// The VM may have ended while it waited (its QEMU killed, by the host's OOM killer among others), or its
	// guest hung: a task in it would fail. A hung guest would not answer Close's shutdown request either: its VM
	// is stopped now, as an unresponsive pod's is.
	if err := p.sb.Check(ctx, spareCheckTimeout); err != nil {
		p.stopUnresponsive(err)
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
		m, ok := p.sb.Machine().(netPlugger)
		if !ok {
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
	return nil
}

// spareCheckTimeout bounds Adopt's health check of the spare's agent, which answers in milliseconds when it is
// alive: a hung guest costs its task that long before a VM boots for it.
const spareCheckTimeout = 2 * time.Second

// netPlugger is a running VM that takes NICs (qemu.Machine restored from a template).
type netPlugger interface {
	PlugNets(ctx context.Context, nets []qemu.Net) error
}

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
