package container

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/moby/sys/user"
	"github.com/opencontainers/cgroups"
	"github.com/opencontainers/runc/libcontainer"
	"github.com/opencontainers/runc/libcontainer/configs"
	"github.com/opencontainers/runc/libcontainer/specconv"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/kiln-runtime/kiln/agent"
	"github.com/kiln-runtime/kiln/rlimit"
)

// rootfsPath resolves the request's rootfs, relative to the shared
// directory, refusing anything that would leave it.
func rootfsPath(sharedDir, rootfs string) (string, error) {
	if rootfs == "" {
		return "", fmt.Errorf("empty rootfs")
	}
	clean := path.Clean(rootfs)
	if path.IsAbs(rootfs) || clean == "." || clean == ".." || strings.HasPrefix(clean, "../") {
		return "", fmt.Errorf("rootfs %q is not a path inside the shared directory", rootfs)
	}
	return filepath.Join(sharedDir, filepath.FromSlash(clean)), nil
}

// podNamespaces says where a container's namespaces come from in the guest.
type podNamespaces struct {
	// net is the file of the pod's network namespace, which every container joins.
	net string
	// isInit reports whether pid is the init process of one of the pod's containers.
	isInit func(pid int) bool
}

// adaptSpec parses the host's OCI spec and makes it fit the guest: the root
// is the shared rootfs, the network is the pod's (whatever the host's spec
// named: the host mirrored that namespace into the VM), hooks name host
// binaries that run on the host, and the cgroup lives in the guest's own
// hierarchy. Other namespaces given by path must be those of another
// container of the pod: CRI names them /proc/<init pid>/ns/<type>, with the
// guest pid the host reported.
func adaptSpec(raw []byte, id, root string, ns podNamespaces) (*specs.Spec, error) {
	var spec specs.Spec
	if err := json.Unmarshal(raw, &spec); err != nil {
		return nil, fmt.Errorf("parse OCI spec: %w", err)
	}
	if spec.Process == nil {
		return nil, fmt.Errorf("OCI spec has no process")
	}
	if spec.Root == nil {
		spec.Root = &specs.Root{}
	}
	spec.Root.Path = root
	spec.Hooks = nil
	if spec.Linux == nil {
		spec.Linux = &specs.Linux{}
	}
	spec.Linux.Namespaces = slices.DeleteFunc(spec.Linux.Namespaces, func(n specs.LinuxNamespace) bool {
		return n.Type == specs.NetworkNamespace
	})
	for _, n := range spec.Linux.Namespaces {
		if n.Path != "" && !joinsPodContainer(n, ns.isInit) {
			return nil, fmt.Errorf("%s namespace %s: a container can only join a namespace of another container of its pod (/proc/<init pid>/ns/<type>)", n.Type, n.Path)
		}
	}
	spec.Linux.Namespaces = append(spec.Linux.Namespaces, specs.LinuxNamespace{Type: specs.NetworkNamespace, Path: ns.net})
	fitCgroupNamespace(&spec)
	spec.Linux.CgroupsPath = guestCgroupPath(spec.Linux.CgroupsPath, id)
	if r := spec.Linux.Resources; r != nil {
		r.HugepageLimits = guestHugepages(r.HugepageLimits, cgroups.HugePageSizes())
	}
	return &spec, nil
}

// openInRoot opens p with flags, every component of it resolved inside root (openat2's RESOLVE_IN_ROOT). The
// kernel answers EAGAIN to a resolution through ".." while any mount or rename happens anywhere in the guest
// (another container's start makes many): it is tried again, a bounded number of times.
func openInRoot(root *os.File, p string, flags int) (int, error) {
	how := &unix.OpenHow{Flags: uint64(flags), Resolve: unix.RESOLVE_IN_ROOT | unix.RESOLVE_NO_MAGICLINKS}
	var err error
	for range 128 {
		var fd int
		if fd, err = unix.Openat2(int(root.Fd()), p, how); !errors.Is(err, unix.EAGAIN) {
			return fd, err
		}
	}
	return -1, err
}

// fitCgroupNamespace gives the container what containerd gives it on a cgroup v2 host, which the guest always is
// (a spec made on a v1 host has neither): a cgroup namespace of its own unless it is privileged, so that it sees
// its own cgroup, not every container's of the pod; and, for a privileged one, left in the guest's initial cgroup
// namespace, the guest hierarchy's own options on its cgroup mounts. Mounting cgroup2 from the initial namespace
// sets the hierarchy's flags to the mount's options: a container's mount without nsdelegate would take it off for
// the whole guest, and with it what stops a container's root (in a user namespace of its own) from raising its
// own limits, writes to a cgroup namespace's root files; one with memory_localevents would change what every
// memory.events counts, which the agent's OOM watcher reads.
func fitCgroupNamespace(spec *specs.Spec) {
	if slices.ContainsFunc(spec.Linux.Namespaces, func(n specs.LinuxNamespace) bool { return n.Type == specs.CgroupNamespace }) {
		return
	}
	if !privileged(spec) {
		spec.Linux.Namespaces = append(spec.Linux.Namespaces, specs.LinuxNamespace{Type: specs.CgroupNamespace})
		return
	}
	for i, m := range spec.Mounts {
		if m.Type != "cgroup" && m.Type != "cgroup2" {
			continue
		}
		opts := slices.DeleteFunc(slices.Clone(m.Options), isCgroupRootFlag)
		spec.Mounts[i].Options = append(opts, cgroupDelegate)
	}
}

// privileged says whether the spec is a privileged container's as containerd makes it (CRI's privileged,
// `ctr run --privileged`): CAP_SYS_ADMIN, and no masked paths. One given CAP_SYS_ADMIN alone is not.
func privileged(spec *specs.Spec) bool {
	c := spec.Process.Capabilities
	return c != nil && slices.Contains(c.Bounding, "CAP_SYS_ADMIN") && len(spec.Linux.MaskedPaths) == 0
}

// cgroupDelegate is the option the agent mounts the guest's cgroup2 hierarchy with (agent.Mounts).
const cgroupDelegate = "nsdelegate"

// isCgroupRootFlag says whether o is a cgroup2 mount option that sets the hierarchy's flags (Linux 6.1).
func isCgroupRootFlag(o string) bool {
	switch o {
	case "nsdelegate", "favordynmods", "memory_localevents", "memory_recursiveprot":
		return true
	}
	return false
}

// fitUserNamespace fits a container with a user namespace to the pod's network namespace, which belongs to the
// guest's initial user namespace (the agent makes it before any container), where the container's root is
// nobody: it could neither mount a sysfs (which needs CAP_SYS_ADMIN over the network namespace's owner) nor
// write net.* sysctls. On a runc host CRI makes the pod's network namespace inside the pod's user namespace. Here
// the sysfs becomes a bind of one the agent mounted from inside the pod namespace (podSysfs), which shows the
// pod's interfaces as the container's own sysfs would, and the net.* sysctls are taken out of the spec and
// returned for the agent to write.
func fitUserNamespace(spec *specs.Spec, podSysfs func() (string, error)) (netSysctls map[string]string, err error) {
	if !slices.ContainsFunc(spec.Linux.Namespaces, func(n specs.LinuxNamespace) bool { return n.Type == specs.UserNamespace }) {
		return nil, nil
	}
	for k, v := range spec.Linux.Sysctl {
		if strings.HasPrefix(k, "net.") {
			if netSysctls == nil {
				netSysctls = map[string]string{}
			}
			netSysctls[k] = v
			delete(spec.Linux.Sysctl, k)
		}
	}
	for i, m := range spec.Mounts {
		if m.Type != "sysfs" {
			continue
		}
		src, err := podSysfs()
		if err != nil {
			return nil, err
		}
		opts := []string{"rbind"}
		for _, o := range m.Options {
			switch o {
			case "ro", "nosuid", "noexec", "nodev":
				opts = append(opts, o)
			}
		}
		spec.Mounts[i] = specs.Mount{Destination: m.Destination, Type: "bind", Source: src, Options: opts}
	}
	return netSysctls, nil
}

// nsFiles maps the spec's namespace types to their names under /proc/<pid>/ns.
var nsFiles = map[specs.LinuxNamespaceType]string{
	specs.PIDNamespace: "pid", specs.IPCNamespace: "ipc", specs.UTSNamespace: "uts", specs.MountNamespace: "mnt",
	specs.CgroupNamespace: "cgroup", specs.UserNamespace: "user", specs.TimeNamespace: "time",
}

// joinsPodContainer says whether n's path is /proc/<pid>/ns/<its type> for the init of a container of the pod.
func joinsPodContainer(n specs.LinuxNamespace, isInit func(int) bool) bool {
	rest, ok := strings.CutPrefix(n.Path, "/proc/")
	if !ok {
		return false
	}
	pidStr, file, ok := strings.Cut(rest, "/ns/")
	if !ok || file != nsFiles[n.Type] {
		return false
	}
	pid, err := strconv.Atoi(pidStr)
	return err == nil && pid > 0 && isInit != nil && isInit(pid)
}

// guestCgroupPath puts every container's cgroup below agent.ContainersCgroup, whose pids.max keeps threads back
// for the guest: a plain absolute cgroup path from the spec is kept below it, and anything else (empty,
// relative, systemd's "slice:prefix:name") is replaced with the container's id, as runc's default is: the guest
// has no systemd and the host's layout means nothing in it.
func guestCgroupPath(p, id string) string {
	if strings.HasPrefix(p, "/") && !strings.Contains(p, ":") && path.Clean(p) != "/" {
		// Cleaned first: rooted, ".." cannot climb out of the parent.
		return path.Join(agent.ContainersCgroup, path.Clean(p))
	}
	return path.Join(agent.ContainersCgroup, id)
}

// libcontainerConfig turns an adapted spec into libcontainer's config.
// noPivotRoot is needed while the guest's root is the initramfs, where
// pivot_root(2) fails.
func libcontainerConfig(spec *specs.Spec, id string, noPivotRoot bool) (*configs.Config, error) {
	cfg, err := specconv.CreateLibcontainerConfig(&specconv.CreateOpts{
		CgroupName:  id,
		NoPivotRoot: noPivotRoot,
		Spec:        spec,
	})
	if err != nil {
		return nil, fmt.Errorf("convert OCI spec of %s: %w", id, err)
	}
	return cfg, nil
}

// newProcess turns an OCI process into a libcontainer process, the way runc
// does, plus user names: a username is looked up in the container's
// /etc/passwd and /etc/group (uid, gid, supplementary groups).
func newProcess(p *specs.Process, rootfs string) (*libcontainer.Process, error) {
	uid, gid := int(p.User.UID), int(p.User.GID)
	var groups []int
	if p.User.Username != "" {
		u, err := lookupUser(rootfs, p.User.Username)
		if err != nil {
			return nil, err
		}
		uid, gid, groups = u.Uid, u.Gid, u.Sgids
	}
	for _, g := range p.User.AdditionalGids {
		if !slices.Contains(groups, int(g)) {
			groups = append(groups, int(g))
		}
	}
	noNewPrivs := p.NoNewPrivileges
	lp := &libcontainer.Process{
		Args:             p.Args,
		Env:              p.Env,
		UID:              uid,
		GID:              gid,
		AdditionalGroups: groups,
		Cwd:              p.Cwd,
		Label:            p.SelinuxLabel,
		NoNewPrivileges:  &noNewPrivs,
		AppArmorProfile:  p.ApparmorProfile,
		Scheduler:        p.Scheduler,
		IOPriority:       p.IOPriority,
	}
	if p.ConsoleSize != nil {
		lp.ConsoleWidth = uint16(p.ConsoleSize.Width)
		lp.ConsoleHeight = uint16(p.ConsoleSize.Height)
	}
	if c := p.Capabilities; c != nil {
		lp.Capabilities = &configs.Capabilities{
			Bounding:    c.Bounding,
			Effective:   c.Effective,
			Inheritable: c.Inheritable,
			Permitted:   c.Permitted,
			Ambient:     c.Ambient,
		}
	}
	for _, r := range p.Rlimits {
		kind, ok := rlimit.Number(r.Type)
		if !ok {
			return nil, fmt.Errorf("unknown rlimit %q", r.Type)
		}
		lp.Rlimits = append(lp.Rlimits, configs.Rlimit{Type: kind, Hard: r.Hard, Soft: r.Soft})
	}
	aff, err := configs.ConvertCPUAffinity(p.ExecCPUAffinity)
	if err != nil {
		return nil, fmt.Errorf("convert exec CPU affinity: %w", err)
	}
	lp.CPUAffinity = aff
	return lp, nil
}

// lookupUser resolves "name", "name:group", "uid:gid"... in the container's
// own user database. The files are opened by the kernel's resolution inside
// rootfs (openat2's RESOLVE_IN_ROOT), so that a symlink in the image, or one a
// running container swaps in for a directory on the way, cannot point the agent
// at the guest's files or another container's.
func lookupUser(rootfs, spec string) (*user.ExecUser, error) {
	root, err := os.OpenFile(rootfs, unix.O_PATH|unix.O_DIRECTORY, 0)
	if err != nil {
		return nil, fmt.Errorf("look up user %q: open the container's root: %w", spec, err)
	}
	defer root.Close()
	// A running container can make them anything: they are opened without waiting (a FIFO would hold the agent's
	// handler for as long as no one writes it) and read only if what was opened is a regular file.
	var readers [2]io.Reader
	for i, p := range []string{"etc/passwd", "etc/group"} {
		fd, err := openInRoot(root, p, unix.O_RDONLY|unix.O_NONBLOCK|unix.O_CLOEXEC)
		if errors.Is(err, unix.ENOENT) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("look up user %q: open the container's /%s: %w", spec, p, err)
		}
		f := os.NewFile(uintptr(fd), "/"+p)
		defer f.Close()
		if fi, err := f.Stat(); err != nil || !fi.Mode().IsRegular() {
			return nil, fmt.Errorf("look up user %q: the container's /%s is not a regular file", spec, p)
		}
		readers[i] = f
	}
	u, err := user.GetExecUser(spec, &user.ExecUser{}, readers[0], readers[1])
	if err != nil {
		return nil, fmt.Errorf("look up user %q in the container's /etc/passwd: %w", spec, err)
	}
	return u, nil
}
