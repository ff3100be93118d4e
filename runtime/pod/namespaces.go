package pod

import (
	"fmt"
	"slices"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// isContainerPid says whether pid is the host pid of a container of the pod (its stand-in's, runtime/standin)
// whose init has not stopped.
func (p *Pod) isContainerPid(pid uint32) bool {
	_, ok := p.ctrs.GuestInitPid(pid)
	return ok
}

// guestNamespaces points the namespace paths of spec that name a container of the pod, as CRI names its
// sandbox's (/proc/<the pid Kiln reported>/ns/<type>, or its /proc/<pid>/task/<tid>/ns/<type> form), at that
// container's init in the guest (guestInit maps one to the other, container.Manager.GuestInitPid), where the
// agent joins them, and returns the spec, sharing nothing it changes with spec. Any other such path names a host
// process, whose namespaces cannot reach the VM: it is refused. The network namespace is the pod's
// whatever the path (checkJoin), and other paths are the agent's to refuse.
func guestNamespaces(id string, spec specs.Spec, guestInit func(hostPid uint32) (uint32, bool)) (specs.Spec, error) {
	if spec.Linux == nil {
		return spec, nil
	}
	var namespaces []specs.LinuxNamespace
	for i, n := range spec.Linux.Namespaces {
		if n.Type == specs.NetworkNamespace {
			continue
		}
		pid, file, ok := procNSPath(n.Path)
		if !ok {
			continue
		}
		guest, ok := guestInit(uint32(pid))
		if !ok {
			return spec, fmt.Errorf("%w: container %s: %s namespace %s is not that of a running container of its pod: a container in a Kiln VM can only join the namespaces of its pod's containers (/proc/<the pid Kiln reported for one>/ns/<type>)",
				errdefs.ErrInvalidArgument, id, n.Type, n.Path)
		}
		if namespaces == nil {
			namespaces = slices.Clone(spec.Linux.Namespaces)
		}
		namespaces[i].Path = fmt.Sprintf("/proc/%d/ns/%s", guest, file)
	}
	if namespaces != nil {
		linux := *spec.Linux
		linux.Namespaces = namespaces
		spec.Linux = &linux
	}
	return spec, nil
}
