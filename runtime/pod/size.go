package pod

import (
	"fmt"
	"maps"
	"strconv"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/kiln-runtime/kiln/config"
)

// Size is the configuration of a pod booted for first: the configuration's VM grown by the pod's resources.
// A CRI sandbox carries them as annotations; a container started on its own (ctr run --memory-limit) carries
// its own limits, and its VM grows by those the same way.
func Size(cfg config.Config, first *First) (config.Config, error) {
	spec := first.Bundle.Spec
	annotations := maps.Clone(spec.Annotations)
	if annotations == nil {
		annotations = map[string]string{}
	}
	_, criQuota := annotations[config.CRISandboxCPUQuota]
	_, criMem := annotations[config.CRISandboxMemory]
	if !criQuota && !criMem && spec.Linux != nil && spec.Linux.Resources != nil {
		r := spec.Linux.Resources
		if r.CPU != nil && r.CPU.Quota != nil && r.CPU.Period != nil && *r.CPU.Quota > 0 {
			annotations[config.CRISandboxCPUQuota] = strconv.FormatInt(*r.CPU.Quota, 10)
			annotations[config.CRISandboxCPUPeriod] = strconv.FormatUint(*r.CPU.Period, 10)
		}
		if r.Memory != nil && r.Memory.Limit != nil && *r.Memory.Limit > 0 {
			annotations[config.CRISandboxMemory] = strconv.FormatInt(*r.Memory.Limit, 10)
		}
	}
	sized, err := cfg.ForPod(annotations)
	if err != nil {
		return config.Config{}, fmt.Errorf("%w: container %s: %v", errdefs.ErrInvalidArgument, first.ID, err)
	}
	return sized, nil
}

// Fits refuses resources that a container of the pod cannot have: more memory or CPU than the VM has. Within
// the VM, the guest's cgroups enforce them.
func (p *Pod) Fits(id string, r *specs.LinuxResources) error {
	if r == nil {
		return nil
	}
	h := p.cfg.Hypervisor
	if r.Memory != nil && r.Memory.Limit != nil && *r.Memory.Limit > int64(h.MemoryMiB)<<20 {
		return fmt.Errorf("%w: container %s: memory limit %d MiB is more than its pod's VM has (%d MiB); size the pod with its resources or io.kiln.memory_mib",
			errdefs.ErrInvalidArgument, id, *r.Memory.Limit>>20, h.MemoryMiB)
	}
	if r.CPU != nil && r.CPU.Quota != nil && r.CPU.Period != nil && *r.CPU.Period > 0 && *r.CPU.Quota > int64(*r.CPU.Period)*int64(h.VCPUs) {
		return fmt.Errorf("%w: container %s: CPU quota %d/%d is more than its pod's VM has (%d vCPUs); size the pod with its resources or io.kiln.vcpus",
			errdefs.ErrInvalidArgument, id, *r.CPU.Quota, *r.CPU.Period, h.VCPUs)
	}
	return nil
}
