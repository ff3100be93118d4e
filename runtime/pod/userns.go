package pod

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

// guestUserNamespace fits a container's user namespace to the guest and returns the spec to send, sharing
// nothing with spec that it changes. CRI gives a pod's sandbox the path of a user namespace it pinned on the
// host with the pod's mappings (and makes the pod's network namespace there belong to it); that namespace
// cannot reach the guest, so the sandbox's container gets a new one there with the same mappings, which the
// spec carries. The pod's other containers name it /proc/<sandbox pid>/ns/user, the guest's, and join it.
// Any other path, or a host namespace without the mappings, is refused: the guest could not reproduce it.
// Volumes with mappings of their own (idmapped bind mounts) are the share's to idmap (see share.BindOptions).
func guestUserNamespace(id string, spec specs.Spec, isInit func(uint32) bool) (specs.Spec, error) {
	if spec.Linux == nil {
		return spec, nil
	}
	i := slices.IndexFunc(spec.Linux.Namespaces, func(n specs.LinuxNamespace) bool { return n.Type == specs.UserNamespace })
	if i < 0 {
		return spec, nil
	}
	if err := checkProcessMapped(spec); err != nil {
		return spec, fmt.Errorf("%w: container %s: %v", errdefs.ErrInvalidArgument, id, err)
	}
	if spec.Linux.Namespaces[i].Path == "" {
		return spec, nil
	}
	path := spec.Linux.Namespaces[i].Path
	if pid, ok := procNSPid(path, "user"); ok {
		// CRI's /proc paths name the pids Kiln reported, a stand-in's for each container (runtime/standin).
		if isInit(uint32(pid)) {
			return spec, nil
		}
		return spec, fmt.Errorf("%w: container %s: user namespace %s is not that of a container of the pod", errdefs.ErrInvalidArgument, id, path)
	}
	if len(spec.Linux.UIDMappings) == 0 || len(spec.Linux.GIDMappings) == 0 {
		return spec, fmt.Errorf("%w: container %s: user namespace %s without linux.uidMappings and linux.gidMappings: a host user namespace cannot reach the pod's VM, which can only make one from the mappings (give them, or name /proc/<pid of a container of the pod>/ns/user)",
			errdefs.ErrInvalidArgument, id, path)
	}
	if err := checkUserNamespace(path); err != nil {
		return spec, fmt.Errorf("%w: container %s: %v", errdefs.ErrInvalidArgument, id, err)
	}
	linux := *spec.Linux
	linux.Namespaces = slices.Clone(linux.Namespaces)
	linux.Namespaces[i].Path = ""
	spec.Linux = &linux
	return spec, nil
}

// checkProcessMapped refuses a process whose uid or gid the spec's mappings leave out (CRI's "container id 0
// is not mapped"): the guest would fail to start it with a bare "invalid argument".
func checkProcessMapped(spec specs.Spec) error {
	if spec.Process == nil {
		return nil
	}
	mapped := func(id uint32, maps []specs.LinuxIDMapping) bool {
		return len(maps) == 0 || slices.ContainsFunc(maps, func(m specs.LinuxIDMapping) bool {
			return id >= m.ContainerID && uint64(id) < uint64(m.ContainerID)+uint64(m.Size)
		})
	}
	u := spec.Process.User
	if !mapped(u.UID, spec.Linux.UIDMappings) {
		return fmt.Errorf("process.user.uid %d is not mapped by linux.uidMappings %v: map it (a pod's mappings must start at container id 0)", u.UID, spec.Linux.UIDMappings)
	}
	if !mapped(u.GID, spec.Linux.GIDMappings) {
		return fmt.Errorf("process.user.gid %d is not mapped by linux.gidMappings %v: map it (a pod's mappings must start at container id 0)", u.GID, spec.Linux.GIDMappings)
	}
	return nil
}

// checkUserNamespace makes sure path is a user namespace, as CRI's pinned namespace is, and not a file that
// happens to be named so.
func checkUserNamespace(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("open user namespace: %w", err)
	}
	defer f.Close()
	typ, err := unix.IoctlRetInt(int(f.Fd()), unix.NS_GET_NSTYPE)
	if err != nil {
		return fmt.Errorf("user namespace %s: not a namespace: %w", path, err)
	}
	if typ != unix.CLONE_NEWUSER {
		return fmt.Errorf("user namespace %s is a namespace of another type", path)
	}
	return nil
}

// procNSPid reads the pid of a /proc/<pid>/ns/<file> or /proc/<pid>/task/<tid>/ns/<file> path: the task whose
// namespace it names.
func procNSPid(path, file string) (int, bool) {
	pid, f, ok := procNSPath(path)
	return pid, ok && f == file
}

// procNSPath splits a /proc/<pid>/ns/<file> or /proc/<pid>/task/<tid>/ns/<file> path, cleaned, into the task
// whose namespace it names (the tid for the second form, which must be a thread of pid: the path exists only
// then) and the namespace file.
func procNSPath(path string) (pid int, file string, ok bool) {
	rest, ok := strings.CutPrefix(filepath.Clean(path), "/proc/")
	if !ok {
		return 0, "", false
	}
	parts := strings.Split(rest, "/")
	switch {
	case len(parts) == 3 && parts[1] == "ns":
	case len(parts) == 5 && parts[1] == "task" && parts[3] == "ns":
		if n, err := strconv.Atoi(parts[0]); err != nil || n <= 0 || strconv.Itoa(n) != parts[0] {
			return 0, "", false
		}
		if _, err := os.Stat(filepath.Join("/proc", parts[0], "task", parts[2])); err != nil {
			return 0, "", false
		}
		parts = parts[2:]
	default:
		return 0, "", false
	}
	pid, err := strconv.Atoi(parts[0])
	return pid, parts[2], err == nil && pid > 0 && strconv.Itoa(pid) == parts[0] && parts[2] != ""
}
