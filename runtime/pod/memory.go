package pod

import (
	"context"
	"fmt"
	"maps"

	"github.com/containerd/errdefs"
	"github.com/sirupsen/logrus"

	"github.com/kiln-runtime/kiln/config"
	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
)

// memoryVM is a VM whose guest memory can grow (qemu.Machine).
type memoryVM interface {
	GuestMemory() (now, most int)
	GrowGuestMemory(mib int) error
}

// memoryAgent is the guest's side of a growth: its agent adds the memory (agentv1.AgentService).
type memoryAgent interface {
	AddMemory(ctx context.Context, req *agentv1.AddMemoryRequest) (*agentv1.AddMemoryResponse, error)
}

// fitMemory makes the VM hold container id with memory limit limit (bytes; 0 or less: none) beside the pod's
// other containers, and records the limit. A VM that can grow (config.Hypervisor.MemoryLayout) needs its boot
// memory plus every container's limit, as a pod booted for them all would have (ForPod), and grows to it when
// it has less: a spare's pod's first container, a container's limit raised in place (Kubernetes' pod resize). A VM
// that cannot refuses a limit beyond its memory. Memory is never given back: a lowered limit leaves the VM as it is.
func (p *Pod) fitMemory(ctx context.Context, id string, limit int64) error {
	p.memMu.Lock()
	defer p.memMu.Unlock()
	limits := maps.Clone(p.limits)
	if limits == nil {
		limits = map[string]int64{}
	}
	if limit > 0 {
		limits[id] = limit
	} else {
		delete(limits, id)
	}
	h := p.cfg.Hypervisor
	if boot, ram := h.MemoryLayout(); boot == ram {
		if limit > int64(h.MemoryMiB)<<20 {
			return fmt.Errorf("%w: container %s: memory limit %d MiB is more than its pod's VM has (%d MiB), which cannot grow (hypervisor.memory_max_mib); size the pod with its resources or io.kiln.memory_mib",
				errdefs.ErrInvalidArgument, id, limit>>20, h.MemoryMiB)
		}
	} else if err := p.growMemory(ctx, podMemory(h.BootMemory(), limits)); err != nil {
		return fmt.Errorf("container %s: memory limit %d MiB: %w", id, limit>>20, err)
	}
	p.limits = limits
	return nil
}

// forgetMemory drops a deleted container's limit from what the pod needs (its memory stays in the VM).
func (p *Pod) forgetMemory(id string) {
	p.memMu.Lock()
	defer p.memMu.Unlock()
	delete(p.limits, id)
}

// podMemory is what a pod of containers with limits needs, in MiB: boot, and each limit rounded up to a MiB.
func podMemory(boot int, limits map[string]int64) int {
	need := int64(boot)
	for _, l := range limits {
		need += ceilMiB(l)
		if need > 1<<40 {
			break
		}
	}
	return int(min(need, 1<<40))
}

func ceilMiB(b int64) int64 { return b>>20 + min(b&(1<<20-1), 1) }

// growMemory brings the VM's guest memory to at least mib MiB (rounded up to a memory block), if it has less.
func (p *Pod) growMemory(ctx context.Context, mib int) error {
	m, ok := p.sb.Machine().(memoryVM)
	if !ok {
		return fmt.Errorf("%w: the pod's VM cannot grow", errdefs.ErrNotImplemented)
	}
	from, to, err := growMemory(ctx, m, p.sb.Agent(), mib)
	if err != nil || from == to {
		return err
	}
	p.log.WithFields(logrus.Fields{"from_mib": from, "to_mib": to}).Info("the VM's memory grew")
	return nil
}

// growMemory has m make room for mib MiB (rounded up to config.MemoryBlockMiB) of guest memory and a add it,
// and returns the guest memory before and after, equal when it had enough.
func growMemory(ctx context.Context, m memoryVM, a memoryAgent, mib int) (from, to int, _ error) {
	now, most := m.GuestMemory()
	if mib <= now {
		return now, now, nil
	}
	to = (mib + config.MemoryBlockMiB - 1) / config.MemoryBlockMiB * config.MemoryBlockMiB
	if to > most {
		return now, now, fmt.Errorf("%w: the pod needs %d MiB of memory, and its VM can grow to %d MiB: raise hypervisor.memory_max_mib", errdefs.ErrInvalidArgument, mib, most)
	}
	if err := m.GrowGuestMemory(to); err != nil {
		return now, now, fmt.Errorf("grow the VM's memory from %d to %d MiB: %w", now, to, err)
	}
	resp, err := a.AddMemory(ctx, &agentv1.AddMemoryRequest{MemoryMib: uint64(to)})
	if err != nil {
		return now, to, fmt.Errorf("grow the VM's memory from %d to %d MiB: %w", now, to, err)
	}
	if got := resp.GetMemoryMib(); got < uint64(to) {
		return now, to, fmt.Errorf("grow the VM's memory from %d to %d MiB: the guest has %d MiB", now, to, got)
	}
	return now, to, nil
}
