package pod

import "github.com/sirupsen/logrus"

// memoryAllower is a VM whose cgroup's memory limit can grow beyond the VM's own (qemu.Machine).
type memoryAllower interface {
	AllowHostMemory(extra int64) error
}

// allowVolumeMemory lets the VM's cgroup hold the host tmpfs volumes the pod's containers write through virtio-fs
// (share.TmpfsBytes) beside the VM's own memory. virtiofsd writes their pages, so the host charges them to the
// VM's cgroup, whose limit is the guest's RAM and QEMU's overhead: a container filling a tmpfs volume (a memory
// emptyDir, a host tmpfs directory) would have its whole VM killed by the OOM killer after a couple of hundred
// megabytes, where under runc the pages count against the container's and the pod's limits. With the allowance
// the pod's host cgroup, above the VM's, bounds them as it does under runc. The limit only grows: the files stay
// in the volume when their container goes.
func (p *Pod) allowVolumeMemory() {
	m, ok := p.sb.Machine().(memoryAllower)
	if !ok {
		return
	}
	n, err := p.share.TmpfsBytes()
	if err != nil {
		p.log.WithError(err).Warn("the VM's cgroup keeps its memory limit: its containers' tmpfs volumes count against it")
		return
	}
	p.hostMemMu.Lock()
	defer p.hostMemMu.Unlock()
	if n <= p.volumeMemory {
		return
	}
	if err := m.AllowHostMemory(n); err != nil {
		p.log.WithError(err).Warn("the VM's cgroup keeps its memory limit: its containers' tmpfs volumes count against it")
		return
	}
	p.volumeMemory = n
	p.log.WithFields(logrus.Fields{"tmpfs_bytes": n}).Info("the VM's cgroup now also holds the host tmpfs volumes its containers write")
}
