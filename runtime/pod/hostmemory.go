package pod

import (
	"github.com/sirupsen/logrus"

	"github.com/kiln-runtime/kiln/runtime/share"
)

// memoryAllower is a VM whose cgroup's memory limit can grow beyond the VM's own (qemu.Machine).
type memoryAllower interface {
	AllowHostMemory(extra int64) error
}

// allowVolumeMemory lets the VM's cgroup hold the host tmpfs volumes the pod's containers write through virtio-fs
// (share.Tmpfs) beside the VM's own memory. virtiofsd writes their pages, so the host charges them to the VM's
// cgroup, whose limit is the guest's RAM and QEMU's overhead: a container filling a tmpfs volume (a memory
// emptyDir, a host tmpfs directory) would have its whole VM killed by the OOM killer after a couple of hundred
// megabytes, where under runc the pages count against the container's and the pod's limits. With the allowance
// the pod's host cgroup, above the VM's, bounds them as it does under runc. Each tmpfs counts once, for as long
// as the pod runs: its pages stay charged when the container that wrote them goes.
func (p *Pod) allowVolumeMemory() {
	m, ok := p.sb.Machine().(memoryAllower)
	if !ok {
		return
	}
	sizes, err := p.share.Tmpfs()
	if err != nil {
		p.log.WithError(err).Warn("the VM's cgroup keeps its memory limit: its containers' tmpfs volumes count against it")
		return
	}
	p.hostMemMu.Lock()
	defer p.hostMemMu.Unlock()
	total, grew := volumeAllowance(p.volumes, sizes)
	if !grew {
		return
	}
	if err := m.AllowHostMemory(total); err != nil {
		p.log.WithError(err).Warn("the VM's cgroup keeps its memory limit: its containers' tmpfs volumes count against it")
		return
	}
	if p.volumes == nil {
		p.volumes = map[share.Device]int64{}
	}
	for dev, n := range sizes {
		if _, counted := p.volumes[dev]; !counted {
			p.volumes[dev] = n
		}
	}
	p.log.WithFields(logrus.Fields{"tmpfs_bytes": total}).Info("the VM's cgroup now also holds the host tmpfs volumes its containers write")
}

// volumeAllowance is what the VM's cgroup holds for the tmpfs volumes counted so far (by device, with the size
// each had when counted) and those of sizes not counted yet, and says whether there was one.
func volumeAllowance(counted, sizes map[share.Device]int64) (int64, bool) {
	var total int64
	for _, n := range counted {
		total += n
	}
	grew := false
	for dev, n := range sizes {
		if _, ok := counted[dev]; !ok {
			total, grew = total+n, true
		}
	}
	return total, grew
}
