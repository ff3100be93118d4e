package pod

import (
	"errors"
	"fmt"
	"path"
	"path/filepath"
	"slices"
	"strings"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/kiln-runtime/kiln/config"
	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
	"github.com/kiln-runtime/kiln/runtime/hooks"
	"github.com/kiln-runtime/kiln/runtime/hostlsm"
	"github.com/kiln-runtime/kiln/runtime/network"
	"github.com/kiln-runtime/kiln/runtime/share"
)

// CheckSpec refuses, before anything of container id is prepared, what its spec asks of the host that a VM
// cannot give (hooks that must run in its namespaces, the host's network, pid or ipc namespace, host CPUs, block
// devices or huge pages, host LSM policy unless cfg ignores it), and returns where its network comes from. A
// task's first container is checked before a spare is taken or started for it: a spec refused anyway would
// spend a warm VM.
func CheckSpec(cfg config.Config, id string, spec *specs.Spec) (network.Source, error) {
	src, err := checkSpec(cfg, id, spec)
	return src, Refuse(err)
}

// refusal is an error that refused a container before any of its create hooks could run: its spec, its id,
// its configuration. FailedCreate runs no poststop hook after one, as runc runs none for a spec it refuses.
type refusal struct{ error }

func (r refusal) Unwrap() error { return r.error }

// Refuse marks err, when not nil, as refusing a container before its create hooks could run.
func Refuse(err error) error {
	if err == nil {
		return nil
	}
	return refusal{err}
}

// Refused says whether err refused a container before its create hooks could run (Refuse).
func Refused(err error) bool {
	var r refusal
	return errors.As(err, &r)
}

func checkSpec(cfg config.Config, id string, spec *specs.Spec) (network.Source, error) {
	if err := hooks.Check(spec); err != nil {
		return network.Source{}, fmt.Errorf("container %s: %w", id, err)
	}
	if err := checkIsolation(spec); err != nil {
		return network.Source{}, fmt.Errorf("container %s: %w", id, err)
	}
	if err := checkPropagation(spec); err != nil {
		return network.Source{}, fmt.Errorf("container %s: %w", id, err)
	}
	if err := CheckProcess(spec.Process); err != nil {
		return network.Source{}, fmt.Errorf("container %s: process: %w", id, err)
	}
	if err := checkHostDevices(spec); err != nil {
		return network.Source{}, fmt.Errorf("container %s: %w", id, err)
	}
	if spec.Linux != nil && spec.Linux.Resources != nil {
		if err := checkHostResources(spec.Linux.Resources); err != nil {
			return network.Source{}, fmt.Errorf("container %s: %w", id, err)
		}
	}
	// Checked on a copy: CreateContainer takes ignored settings out of what the guest gets.
	check := *spec
	if _, err := hostlsm.Spec(cfg.Runtime.IgnoreHostLSM(), &check); err != nil {
		return network.Source{}, fmt.Errorf("container %s: %w", id, err)
	}
	src, err := network.SourceOf(spec)
	if err != nil {
		return network.Source{}, fmt.Errorf("container %s: %w", id, err)
	}
	if src.Path != "" {
		if err := network.CheckNotHost(src.Path); err != nil {
			return network.Source{}, fmt.Errorf("container %s: %w", id, err)
		}
	}
	return src, nil
}

// CheckProcess refuses what a process spec (a container's or an exec's) names of the host that its VM does not
// have: process.execCPUAffinity pins it to host CPUs, which the VM's vCPUs are not, as a cpuset does.
func CheckProcess(p *specs.Process) error {
	if p == nil {
		return nil
	}
	if p.ExecCPUAffinity != nil {
		return fmt.Errorf("%w: execCPUAffinity names host CPUs, which a Kiln VM's vCPUs are not pinned to; remove it (as a cpuset, refused too)", errdefs.ErrInvalidArgument)
	}
	// What runc refuses of every process, before the guest's runc init would fail on it unclearly (no args
	// panics it).
	if len(p.Args) == 0 {
		return fmt.Errorf("%w: args is empty: name the program to run", errdefs.ErrInvalidArgument)
	}
	if p.Cwd != "" && !path.IsAbs(p.Cwd) {
		return fmt.Errorf("%w: cwd %q is not an absolute path", errdefs.ErrInvalidArgument, p.Cwd)
	}
	return nil
}

// checkHostDevices refuses what moves or binds host hardware or host processes a VM does not have:
// linux.netDevices (host network interfaces moved into the container, which the guest would look for among its
// own), linux.memoryPolicy (host NUMA nodes, refused as a cpuset's memory nodes are) and a seccomp profile that
// hands system calls to a seccomp agent (SCMP_ACT_NOTIFY, through listenerPath: the notifications come from the
// VM's kernel, which cannot pass them to a socket on the host; the guest's runc would fail on the path unclearly).
func checkHostDevices(spec *specs.Spec) error {
	if spec.Linux == nil {
		return nil
	}
	if len(spec.Linux.NetDevices) > 0 {
		return fmt.Errorf("%w: linux.netDevices moves host network interfaces into the container, which a Kiln VM cannot: give the pod its interfaces through its network namespace (CNI), or use runc", errdefs.ErrInvalidArgument)
	}
	if spec.Linux.MemoryPolicy != nil {
		return fmt.Errorf("%w: linux.memoryPolicy names host NUMA nodes, which the VM's memory is not bound to: leave it out", errdefs.ErrInvalidArgument)
	}
	// runc connects to listenerPath only for a profile with SCMP_ACT_NOTIFY: one without passes, as under runc.
	if sc := spec.Linux.Seccomp; sc != nil {
		if sc.DefaultAction == specs.ActNotify || slices.ContainsFunc(sc.Syscalls, func(s specs.LinuxSyscall) bool { return s.Action == specs.ActNotify }) {
			return fmt.Errorf("%w: linux.seccomp hands system calls to a seccomp agent on the host (SCMP_ACT_NOTIFY, listenerPath %q), which the container's seccomp in a Kiln VM cannot reach: leave SCMP_ACT_NOTIFY out of the profile, or use runc", errdefs.ErrInvalidArgument, sc.ListenerPath)
		}
	}
	return nil
}

// checkPropagation refuses mounts that propagate from the container back to the host (CRI's Bidirectional, a
// shared or rshared mount or root): a mount made in the guest cannot reach the host, so a CSI plugin's mounts
// would stay in its VM and the workloads that use them write into the bare host directory instead.
func checkPropagation(spec *specs.Spec) error {
	shared := func(opt string) bool { return opt == "shared" || opt == "rshared" }
	if spec.Linux != nil && shared(spec.Linux.RootfsPropagation) {
		return fmt.Errorf("%w: linux.rootfsPropagation %q: mounts made in a Kiln VM cannot propagate to the host (Bidirectional mount propagation); use HostToContainer or none, or runc for it", errdefs.ErrInvalidArgument, spec.Linux.RootfsPropagation)
	}
	for i, m := range spec.Mounts {
		if slices.ContainsFunc(m.Options, shared) {
			return fmt.Errorf("%w: mounts[%d] (%s): propagation shared: mounts made in a Kiln VM cannot propagate to the host (Bidirectional mount propagation); use HostToContainer or none, or runc for it", errdefs.ErrInvalidArgument, i, m.Destination)
		}
	}
	return nil
}

// checkIsolation refuses a spec without a pid, an ipc or a uts namespace (CRI's hostPID and hostIPC,
// --pid=host, --ipc=host, --uts=host). The namespace left to share in a Kiln VM is not the host's but the guest's own, where the agent
// and every container of the pod run: such a container would see and signal them (or use their shared memory)
// instead of the host's processes it asked for, which a VM cannot give it.
func checkIsolation(spec *specs.Spec) error {
	has := func(t specs.LinuxNamespaceType) bool {
		return spec.Linux != nil && slices.ContainsFunc(spec.Linux.Namespaces, func(n specs.LinuxNamespace) bool { return n.Type == t })
	}
	if !has(specs.PIDNamespace) {
		return fmt.Errorf("%w: the spec has no pid namespace (host PID): a Kiln container runs in its own VM and cannot see the host's processes; remove hostPID / --pid=host, or use runc for it", errdefs.ErrInvalidArgument)
	}
	if !has(specs.IPCNamespace) {
		return fmt.Errorf("%w: the spec has no ipc namespace (host IPC): a Kiln container runs in its own VM and cannot share the host's IPC objects or /dev/shm; remove hostIPC / --ipc=host, or use runc for it", errdefs.ErrInvalidArgument)
	}
	if !has(specs.UTSNamespace) {
		return fmt.Errorf("%w: the spec has no uts namespace (host UTS): a Kiln container runs in its own VM and cannot share the host's hostname; remove --uts=host, or use runc for it", errdefs.ErrInvalidArgument)
	}
	return nil
}

// podShm points CRI's pod shm among mounts (the bind of /dev/shm from the tmpfs CRI makes for the pod's sandbox,
// <CRI state>/sandboxes/<sandbox>/shm) at the guest's pod shm instead: one tmpfs in guest memory that the pod's
// containers share, rather than a host tmpfs reached through virtio-fs. It rewrites them in place and says
// which it rewrote, for sharing the other bind mounts to pass them by. Any other bind at /dev/shm (a volume,
// another tool's shm) is shared as the bind it is, with its own contents and size.
func podShm(mounts []specs.Mount, sandbox string) func(i int) bool {
	shm := map[int]bool{}
	if sandbox != "" && !strings.Contains(sandbox, "/") {
		for i, m := range mounts {
			if !share.IsBind(m.Type, m.Options) || path.Clean(m.Destination) != "/dev/shm" || !filepath.IsAbs(m.Source) {
				continue
			}
			if !strings.HasSuffix(filepath.Clean(m.Source), "/sandboxes/"+sandbox+"/shm") {
				continue
			}
			mounts[i].Source = agentv1.GuestPodShm
			shm[i] = true
		}
	}
	return func(i int) bool { return shm[i] }
}
