package pod

import (
	"context"
	"fmt"
	"maps"
	"time"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/sirupsen/logrus"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/kiln-runtime/kiln/config"
	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
)

// memoryVM is a VM whose cgroup holds the memory its guest grows to (qemu.Machine; an adopted spare's QEMU is in
// its pod's cgroup instead, its own left empty).
type memoryVM interface {
	GrowGuestMemory(mib int) error
}

// guestAgent is the guest's side of a growth: its agent adds the memory and brings the vCPUs online
// (agentv1.AgentService).
type guestAgent interface {
	AddMemory(ctx context.Context, req *agentv1.AddMemoryRequest) (*agentv1.AddMemoryResponse, error)
	AddVCPUs(ctx context.Context, req *agentv1.AddVCPUsRequest) (*agentv1.AddVCPUsResponse, error)
}

// containerLimits are what a container adds to what its pod's VM needs: its memory limit in bytes, and its CFS
// quota and period in microseconds (CPUs: quota over period), 0 for none.
type containerLimits struct{ memory, quota, period int64 }

// defaultCFSPeriod is the period a quota without one has (the kernel's, as libcontainer leaves it).
const defaultCFSPeriod = 100000

// milliCPUs is the CPU limit in thousandths of a CPU, rounded up; 0 for none.
func (l containerLimits) milliCPUs() int64 {
	if l.quota <= 0 {
		return 0
	}
	period := l.period
	if period <= 0 {
		period = defaultCFSPeriod
	}
	// Bounded far beyond any VM's CPUs (fit's bound), so that the product does not overflow.
	return ceilDiv(min(l.quota, 1<<40)*1000, min(period, 1<<40))
}

// limitsOf are the limits resources r set over old, as the guest's libcontainer applies them: a field r leaves
// out, and a memory limit of 0, leave what old has (an update changes what it names); a limit of -1 is none.
func limitsOf(r *specs.LinuxResources, old containerLimits) containerLimits {
	l := old
	if r == nil {
		return l
	}
	if m := r.Memory; m != nil && m.Limit != nil && *m.Limit != 0 {
		l.memory = max(*m.Limit, 0)
	}
	if c := r.CPU; c != nil {
		if c.Quota != nil && *c.Quota != 0 {
			l.quota = max(*c.Quota, 0)
		}
		if c.Period != nil && *c.Period != 0 {
			l.period = int64(min(*c.Period, 1<<40))
		}
	}
	return l
}

func ceilDiv(a, b int64) int64 { return a/b + min(a%b, 1) }

func ceilMiB(b int64) int64 { return b>>20 + min(b&(1<<20-1), 1) }

// fit makes the VM hold container id with resources r beside the pod's other containers, and records its limits:
// r replaces what the container had at its create, and changes what it names at an update. A VM that can grow
// (config.Hypervisor.MemoryLayout and CPULayout) needs what it booted with plus its containers' limits (their
// CPUs added up and rounded up once), as a pod booted for them all would have (config.ForPod), and grows to it
// when it has less: a spare's pod's first container, a container's limit raised in place (Kubernetes' pod
// resize). A VM that cannot grow refuses a container's limit beyond what it has. Nothing is ever given back: a
// lowered limit leaves the VM as it is. It returns the container's limits before and after.
func (p *Pod) fit(ctx context.Context, id string, r *specs.LinuxResources, update bool) (before, after containerLimits, err error) {
	p.growMu.Lock()
	defer p.growMu.Unlock()
	var l containerLimits
	if update {
		// A container deleted meanwhile (DeleteContainer drops its bundle before its limits) must not be counted.
		if p.bundleOf(id) == nil {
			return before, after, fmt.Errorf("%w: container %s was deleted", errdefs.ErrNotFound, id)
		}
		l = p.limits[id]
	}
	before = l
	l = limitsOf(r, l)
	limits := maps.Clone(p.limits)
	if limits == nil {
		limits = map[string]containerLimits{}
	}
	if l != (containerLimits{}) {
		limits[id] = l
	} else {
		delete(limits, id)
	}
	var memMiB, milliCPUs int64
	for _, c := range limits {
		memMiB += ceilMiB(c.memory)
		milliCPUs += c.milliCPUs()
		// Beyond what any VM has (config's bounds), and far from overflowing.
		if memMiB > 1<<20 {
			return before, after, fmt.Errorf("%w: container %s: memory limit %d MiB: the pod's containers' limits add up to more than a VM can have (hypervisor.memory_max_mib is at most 1048576)", errdefs.ErrInvalidArgument, id, l.memory>>20)
		}
		if boot, most := p.cfg.Hypervisor.CPULayout(); boot < most && milliCPUs > config.MaxVCPUsMax*1000 {
			return before, after, fmt.Errorf("%w: container %s: a CPU limit of %.3f CPUs: the pod's containers' limits add up to more than a VM can have (hypervisor.vcpus_max is at most %d)", errdefs.ErrInvalidArgument, id, float64(l.milliCPUs())/1000, config.MaxVCPUsMax)
		}
	}
	h := p.cfg.Hypervisor
	if boot, ram := h.MemoryLayout(); boot == ram {
		if l.memory > int64(h.MemoryMiB)<<20 {
			return before, after, fmt.Errorf("%w: container %s: memory limit %d MiB is more than its pod's VM has (%d MiB), which cannot grow (hypervisor.memory_max_mib); size the pod with its resources or io.kiln.memory_mib",
				errdefs.ErrInvalidArgument, id, l.memory>>20, h.MemoryMiB)
		}
	} else if err := p.growMemory(ctx, h.BootMemory()+int(memMiB)); err != nil {
		return before, after, fmt.Errorf("container %s: memory limit %d MiB: %w", id, l.memory>>20, err)
	}
	vcpus := int(ceilDiv(milliCPUs, 1000))
	if boot, most := h.CPULayout(); boot == most {
		if own := int(ceilDiv(l.milliCPUs(), 1000)); own > h.VCPUs {
			return before, after, fmt.Errorf("%w: container %s: a CPU limit of %d vCPUs is more than its pod's VM has (%d), which cannot grow (hypervisor.vcpus_max); size the pod with its resources or io.kiln.vcpus",
				errdefs.ErrInvalidArgument, id, own, h.VCPUs)
		}
	} else if err := p.growVCPUs(ctx, boot+vcpus); err != nil {
		return before, after, fmt.Errorf("container %s: a CPU limit of %.3f CPUs: %w", id, float64(l.milliCPUs())/1000, err)
	}
	p.limits = limits
	return before, l, nil
}

// updater is a container whose resources Update changes in the guest.
type updater interface {
	ID() string
	Update(ctx context.Context, r *specs.LinuxResources) error
}

// Update sizes the VM for container c's new resources and has the guest apply them. Resources the guest does not
// apply leave the pod counting the container's limits as they were, unless another update changed them since.
func (p *Pod) Update(ctx context.Context, c updater, r *specs.LinuxResources) error {
	id := c.ID()
	if r == nil {
		r = &specs.LinuxResources{}
	}
	before, after, err := p.fitChecked(ctx, id, r, true)
	if err != nil {
		return fmt.Errorf("update %w", err) // "container <id>: ..."
	}
	if err := c.Update(ctx, r); err != nil {
		p.growMu.Lock()
		defer p.growMu.Unlock()
		cur, counted := p.limits[id]
		if cur == after && counted == (after != containerLimits{}) && p.bundleOf(id) != nil {
			p.limits[id] = before
			if before == (containerLimits{}) {
				delete(p.limits, id)
			}
		}
		return err
	}
	return nil
}

// forget drops a deleted container's limits from what the pod needs (the VM keeps what it grew to).
func (p *Pod) forget(id string) {
	p.growMu.Lock()
	defer p.growMu.Unlock()
	delete(p.limits, id)
}

// grow brings the VM to the memory and vCPUs of its configuration, which it may have booted with less of
// (config.Hypervisor.MemoryLayout and CPULayout): a pod booted for its first container, or adopting a spare.
func (p *Pod) grow(ctx context.Context) error {
	p.growMu.Lock()
	defer p.growMu.Unlock()
	h := p.cfg.Hypervisor
	if boot, ram := h.MemoryLayout(); boot < ram {
		if err := p.growMemory(ctx, h.MemoryMiB); err != nil {
			return err
		}
	}
	if boot, most := h.CPULayout(); boot < most {
		return p.growVCPUs(ctx, min(h.VCPUs, most))
	}
	return nil
}

// growMemory brings the guest's memory to at least mib MiB (rounded up to a memory block), if it has less; under
// growMu. What the guest has is the pod's record (memMiB, the boot memory until the guest confirms more): after a
// failure the next growth asks the guest again, which adds only what it lacks.
func (p *Pod) growMemory(ctx context.Context, mib int) error {
	boot, most := p.cfg.Hypervisor.MemoryLayout()
	from := max(p.memMiB, boot)
	if mib <= from {
		return nil
	}
	m, ok := p.sb.Machine().(memoryVM)
	if !ok {
		return fmt.Errorf("%w: the pod's VM cannot grow", errdefs.ErrNotImplemented)
	}
	start := time.Now()
	to, err := growMemory(ctx, m, p.sb.Agent(), from, most, mib)
	p.memMiB = to
	if err != nil || from == to {
		return err
	}
	p.log.WithFields(logrus.Fields{"from_mib": from, "to_mib": to, "took": time.Since(start).Round(time.Millisecond)}).Info("the VM's memory grew")
	return nil
}

// growMemory has m hold mib MiB (rounded up to config.MemoryBlockMiB, at most most) of guest memory and the guest
// add it, from now, and returns the guest memory then.
func growMemory(ctx context.Context, m memoryVM, a guestAgent, now, most, mib int) (int, error) {
	if mib <= now {
		return now, nil
	}
	to := (mib + config.MemoryBlockMiB - 1) / config.MemoryBlockMiB * config.MemoryBlockMiB
	if to > most {
		return now, fmt.Errorf("%w: the pod needs %d MiB of memory, and its VM can grow to %d MiB: raise hypervisor.memory_max_mib", errdefs.ErrInvalidArgument, mib, most)
	}
	if err := m.GrowGuestMemory(to); err != nil {
		return now, fmt.Errorf("grow the VM's memory from %d to %d MiB: %w", now, to, err)
	}
	resp, err := a.AddMemory(ctx, &agentv1.AddMemoryRequest{MemoryMib: uint64(to)})
	if status.Code(err) == codes.Unimplemented {
		return now, fmt.Errorf("grow the VM's memory from %d to %d MiB: %w (a guest that cannot add memory, its kernel built without memory hot-plug or its agent older than the shim, needs hypervisor.memory_max_mib = 0)", now, to, err)
	}
	if err != nil {
		return now, fmt.Errorf("grow the VM's memory from %d to %d MiB: %w", now, to, err)
	}
	if got := resp.GetMemoryMib(); got < uint64(to) {
		return now, fmt.Errorf("grow the VM's memory from %d to %d MiB: the guest has %d MiB", now, to, got)
	}
	return to, nil
}

// growVCPUs brings the VM's vCPUs online up to n, if it has fewer online; under growMu.
func (p *Pod) growVCPUs(ctx context.Context, n int) error {
	boot, most := p.cfg.Hypervisor.CPULayout()
	from := max(p.vcpus, boot)
	if n <= from {
		return nil
	}
	start := time.Now()
	to, err := growVCPUs(ctx, p.sb.Agent(), from, most, n)
	p.vcpus = to
	if err != nil || from == to {
		return err
	}
	p.log.WithFields(logrus.Fields{"from": from, "to": to, "took": time.Since(start).Round(time.Millisecond)}).Info("the VM's vCPUs grew")
	return nil
}

// growVCPUs has the guest bring vCPUs online up to n of most, from now, and returns how many are online then.
func growVCPUs(ctx context.Context, a guestAgent, now, most, n int) (int, error) {
	if n <= now {
		return now, nil
	}
	if n > most {
		return now, fmt.Errorf("%w: the pod needs %d vCPUs, and its VM has %d: raise hypervisor.vcpus_max", errdefs.ErrInvalidArgument, n, most)
	}
	resp, err := a.AddVCPUs(ctx, &agentv1.AddVCPUsRequest{Vcpus: uint32(n)})
	if status.Code(err) == codes.Unimplemented {
		return now, fmt.Errorf("bring the VM's vCPUs online from %d to %d: %w (a guest that cannot bring vCPUs online, its kernel built without CPU hot-plug or its agent older than the shim, needs hypervisor.vcpus_max = 0)", now, n, err)
	}
	if err != nil {
		return now, fmt.Errorf("bring the VM's vCPUs online from %d to %d: %w", now, n, err)
	}
	if got := int(resp.GetVcpus()); got < n || got > most {
		return now, fmt.Errorf("bring the VM's vCPUs online from %d to %d: the guest has %d online", now, n, got)
	}
	return n, nil
}
