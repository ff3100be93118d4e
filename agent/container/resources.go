package container

import (
	"maps"
	"slices"

	"github.com/opencontainers/cgroups"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// mergeResources returns cur with the fields an OCI update sets applied and
// the others (devices above all) as they are, the way `runc update` does. The
// result shares nothing the merge changes with cur: cur is the live
// configuration, which libcontainer applies again when applying the result
// fails, so a refused update must leave it as it was.
func mergeResources(cur *cgroups.Resources, r *specs.LinuxResources) *cgroups.Resources {
	merged := *cur
	dst := &merged
	// Pause and Resume own the freezer: an update written back over one of them would freeze or thaw the
	// container again. Undefined leaves cgroup.freeze as it is.
	dst.Freezer = cgroups.Undefined
	dst.HugetlbLimit = make([]*cgroups.HugepageLimit, 0, len(cur.HugetlbLimit))
	for _, h := range cur.HugetlbLimit {
		c := *h
		dst.HugetlbLimit = append(dst.HugetlbLimit, &c)
	}
	dst.Unified = maps.Clone(cur.Unified)
	if m := r.Memory; m != nil {
		setIf(&dst.Memory, m.Limit)
		if m.Limit != nil && *m.Limit == -1 && m.Swap == nil {
			// No memory limit any more, and no swap limit given: none for swap either (0 is unset, which cgroup
			// v2 takes as max beside an unlimited memory), as runc's update does; the old swap limit without a
			// memory limit would be refused.
			dst.MemorySwap = 0
		}
		setIf(&dst.MemoryReservation, m.Reservation)
		setIf(&dst.MemorySwap, m.Swap)
		if m.Swappiness != nil {
			dst.MemorySwappiness = m.Swappiness
		}
		// A limit below what the container uses is then refused instead of reclaiming, as runc's update does.
		if m.CheckBeforeUpdate != nil {
			dst.MemoryCheckBeforeUpdate = *m.CheckBeforeUpdate
		}
	}
	if c := r.CPU; c != nil {
		setIf(&dst.CpuShares, c.Shares)
		if c.Shares != nil {
			// cgroup v2 (the guest's) has cpu.weight, which libcontainer writes from CpuWeight alone: the shares
			// are converted here, as runc's update and its create do.
			dst.CpuWeight = cgroups.ConvertCPUSharesToCgroupV2Value(*c.Shares)
		}
		setIf(&dst.CpuQuota, c.Quota)
		setIf(&dst.CpuPeriod, c.Period)
		setIf(&dst.CpuRtRuntime, c.RealtimeRuntime)
		setIf(&dst.CpuRtPeriod, c.RealtimePeriod)
		if c.Burst != nil {
			dst.CpuBurst = c.Burst
		}
		if c.Idle != nil {
			dst.CPUIdle = c.Idle
			if *c.Idle == 1 {
				// An idle cgroup has no weight: the kernel refuses cpu.weight after cpu.idle=1, as runc's update
				// knows.
				dst.CpuShares, dst.CpuWeight = 0, 0
			}
		}
		if c.Cpus != "" {
			dst.CpusetCpus = c.Cpus
		}
		if c.Mems != "" {
			dst.CpusetMems = c.Mems
		}
	}
	if p := r.Pids; p != nil && p.Limit != nil {
		dst.PidsLimit = p.Limit
	}
	if b := r.BlockIO; b != nil && b.Weight != nil {
		dst.BlkioWeight = *b.Weight
	}
	for _, h := range r.HugepageLimits {
		found := false
		for _, have := range dst.HugetlbLimit {
			if have.Pagesize == h.Pagesize {
				have.Limit = h.Limit
				found = true
			}
		}
		if !found {
			dst.HugetlbLimit = append(dst.HugetlbLimit, &cgroups.HugepageLimit{Pagesize: h.Pagesize, Limit: h.Limit})
		}
	}
	if len(r.Unified) > 0 {
		if dst.Unified == nil {
			dst.Unified = map[string]string{}
		}
		for k, v := range r.Unified {
			dst.Unified[k] = v
		}
	}
	return dst
}

func setIf[T any, P interface{ ~*T }](dst *T, v P) {
	if v != nil {
		*dst = *v
	}
}

// guestHugepages keeps the huge page limits of the page sizes the guest has (have, cgroups.HugePageSizes) and
// those that allow pages. A limit of 0 pages of a size the guest lacks holds without a cgroup file, which the
// guest does not have for it: kubelet gives every container one such limit per size its host has, 1 GiB pages
// among them, which TCG's CPU model has not. A limit that allows pages stays, for libcontainer to refuse (the host
// refuses those first, as no VM reserves huge pages: runtime/pod).
func guestHugepages(limits []specs.LinuxHugepageLimit, have []string) []specs.LinuxHugepageLimit {
	var out []specs.LinuxHugepageLimit
	for _, l := range limits {
		if l.Limit > 0 || slices.Contains(have, l.Pagesize) {
			out = append(out, l)
		}
	}
	return out
}
