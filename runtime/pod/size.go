package pod

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"

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

// Fit makes the pod's VM hold container id with resources r, or refuses them: more memory or CPU than the VM has
// or can grow to (fit), and what no VM has (checkHostResources). Within the VM, the
// guest's cgroups enforce them. It is called for each container the pod creates, and for each update (which
// changes only the limits r names).
func (p *Pod) Fit(ctx context.Context, id string, r *specs.LinuxResources, update bool) error {
	if r == nil {
		r = &specs.LinuxResources{}
	}
	_, _, err := p.fitChecked(ctx, id, r, update)
	return err
}

// fitChecked is fit after checkHostResources: Fit, and Update, which needs the limits before and after.
func (p *Pod) fitChecked(ctx context.Context, id string, r *specs.LinuxResources, update bool) (before, after containerLimits, err error) {
	if err := checkHostResources(r); err != nil {
		return before, after, fmt.Errorf("container %s: %w", id, err)
	}
	return p.fit(ctx, id, r, update)
}

// checkHostResources refuses resources that name what only the host has: CPUs and memory nodes to pin to (a
// cpuset, kubelet's static CPU manager's among them), which in the VM would name its vCPUs instead (or none:
// libcontainer's bare EINVAL), block devices to weigh or throttle, and huge pages, of which a VM's guest reserves
// none. A limit of 0 huge pages (what
// kubelet gives every container) is what the guest has anyway.
func checkHostResources(r *specs.LinuxResources) error {
	var errs []error
	if c := r.CPU; c != nil {
		if c.Cpus != "" {
			errs = append(errs, fmt.Errorf("linux.resources.cpu.cpus = %q names host CPUs, and the VM's vCPUs are not pinned to them: leave the cpuset out (kubelet's static CPU manager policy gives every container one: run Kiln pods on nodes with the none policy, the default)", c.Cpus))
		}
		if c.Mems != "" {
			errs = append(errs, fmt.Errorf("linux.resources.cpu.mems = %q names host memory nodes, and the VM's memory is not bound to them: leave it out", c.Mems))
		}
	}
	if b := r.BlockIO; b != nil && (b.Weight != nil || b.LeafWeight != nil || len(b.WeightDevice) > 0 ||
		len(b.ThrottleReadBpsDevice) > 0 || len(b.ThrottleWriteBpsDevice) > 0 || len(b.ThrottleReadIOPSDevice) > 0 || len(b.ThrottleWriteIOPSDevice) > 0) {
		errs = append(errs, errors.New("linux.resources.blockIO: a Kiln container's files reach it over virtio-fs, with no block device of the host's to weigh or throttle (device numbers name the host's): leave it out"))
	}
	for i, h := range r.HugepageLimits {
		if h.Limit > 0 {
			errs = append(errs, fmt.Errorf("linux.resources.hugepageLimits[%d] = %d bytes of %s pages: a Kiln VM reserves no huge pages; request none, or use runc", i, h.Limit, h.Pagesize))
		}
	}
	// The same, written as cgroup v2 files (linux.resources.unified), which the guest's cgroups would take.
	for _, k := range slices.Sorted(maps.Keys(r.Unified)) {
		if strings.HasPrefix(k, "cpuset.") || strings.HasPrefix(k, "io.") || strings.HasPrefix(k, "hugetlb.") && isPositive(r.Unified[k]) {
			errs = append(errs, fmt.Errorf("linux.resources.unified[%q] = %q names what only the host has (its CPUs and memory nodes, block devices, huge pages): leave it out", k, r.Unified[k]))
		}
	}
	if len(errs) == 0 {
		return nil
	}
	return fmt.Errorf("%w: %w", errdefs.ErrInvalidArgument, errors.Join(errs...))
}

// isPositive says whether a cgroup file's value is a number above 0 ("max" is none: no limit on what the guest has
// none of).
func isPositive(v string) bool {
	n, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
	return err == nil && n > 0
}
