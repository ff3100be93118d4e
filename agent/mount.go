package agent

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/moby/sys/mountinfo"
	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
)

// Mount is one file system the agent mounts at start.
type Mount struct {
	Source string
	Target string
	FSType string
	Flags  uintptr
	Data   string
	// Late marks a file system that the agent API does not need: it is
	// mounted in the background, after the API is served.
	Late bool
}

// CgroupMount is where the guest's cgroup2 hierarchy is mounted.
const CgroupMount = "/sys/fs/cgroup"

// ContainersCgroup is the cgroup, in the guest's hierarchy, that every container's cgroup is below (see
// GuestThreads).
const ContainersCgroup = "/kiln"

// BaseMounts are the file systems every guest gets, in mount order: /proc
// first because a kernel without openat2 leaves isMountPoint to read
// /proc/self/mountinfo, /dev before the file systems below it. Before the agent API the
// guest needs /proc (command line, mount table, guest info), /sys (guest
// info) and /run (the container service's state); the rest is Late. Until
// /dev is mounted the agent logs to the initramfs's own /dev/console.
func BaseMounts() []Mount {
	const common = unix.MS_NOSUID | unix.MS_NODEV
	return []Mount{
		{Source: "proc", Target: "/proc", FSType: "proc", Flags: common | unix.MS_NOEXEC},
		{Source: "sysfs", Target: "/sys", FSType: "sysfs", Flags: common | unix.MS_NOEXEC},
		{Source: "tmpfs", Target: "/run", FSType: "tmpfs", Flags: common, Data: "mode=0755"},
		// devtmpfs gets no MS_NODEV: it is there for device nodes.
		{Source: "devtmpfs", Target: "/dev", FSType: "devtmpfs", Flags: unix.MS_NOSUID, Data: "mode=0755", Late: true},
		// gid 5 is "tty" by convention; a fresh instance keeps the guest's ptys
		// apart from any other devpts mount.
		{Source: "devpts", Target: "/dev/pts", FSType: "devpts", Flags: unix.MS_NOSUID | unix.MS_NOEXEC,
			Data: "newinstance,ptmxmode=0666,mode=0620,gid=5", Late: true},
		{Source: "shm", Target: "/dev/shm", FSType: "tmpfs", Flags: common, Data: "mode=1777", Late: true},
		{Source: "tmpfs", Target: "/tmp", FSType: "tmpfs", Flags: common, Data: "mode=1777", Late: true},
		// The pod's /dev/shm, 64 MiB as CRI's default (a tmpfs takes memory only as it fills).
		{Source: "shm", Target: agentv1.GuestPodShm, FSType: "tmpfs", Flags: common, Data: "mode=1777,size=65536k", Late: true},
		{Source: "cgroup2", Target: CgroupMount, FSType: "cgroup2", Flags: common | unix.MS_NOEXEC,
			Data: "nsdelegate", Late: true},
	}
}

// SplitMounts splits mounts into those the agent API needs and the Late
// ones, keeping the order within each.
func SplitMounts(mounts []Mount) (early, late []Mount) {
	for _, m := range mounts {
		if m.Late {
			late = append(late, m)
		} else {
			early = append(early, m)
		}
	}
	return early, late
}

// MountAll mounts each file system whose target is not a mount point yet,
// creating the target directory when missing. Skipping existing mount points
// lets the agent start on a guest where the kernel or an earlier stage already
// mounted some of them (e.g. devtmpfs automount).
func MountAll(log *logrus.Entry, mounts []Mount) error {
	for _, m := range mounts {
		mounted, err := isMountPoint(m.Target)
		if err != nil {
			return fmt.Errorf("check mount point %s: %w", m.Target, err)
		}
		if mounted {
			log.WithField("target", m.Target).Debug("already mounted")
			continue
		}
		if err := os.MkdirAll(m.Target, 0o755); err != nil {
			return fmt.Errorf("create mount point %s: %w", m.Target, err)
		}
		if err := unix.Mount(m.Source, m.Target, m.FSType, m.Flags, m.Data); err != nil {
			return fmt.Errorf("mount %s on %s: %w", m.FSType, m.Target, err)
		}
		log.WithFields(logrus.Fields{"target": m.Target, "type": m.FSType}).Debug("mounted")
	}
	return nil
}

// isMountPoint reports whether target is a mount point; a target that does not exist is not. openat2(2)'s
// RESOLVE_NO_XDEV answers in two system calls, where reading the mount table parses every mount in it; the
// table is read only where openat2 cannot answer (a kernel without it, where comparing devices misses bind
// mounts).
func isMountPoint(target string) (bool, error) {
	mounted, sure, err := mountinfo.MountedFast(target)
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err == nil && sure {
		return mounted, nil
	}
	// The table names mount points by their resolved paths, as MountedFast resolves target.
	if resolved, err := filepath.EvalSymlinks(target); err == nil {
		target = resolved
	}
	mounts, err := readMountTable(mountinfo.SingleEntryFilter(target))
	return len(mounts) > 0, err
}

// readMountTable parses /proc/self/mountinfo, keeping what filter keeps.
// Before /proc is mounted nothing is (an initramfs has no mounts but its
// root), which is an empty table. It opens the file itself instead of
// calling mountinfo.GetMounts, which decides once per process whether
// /proc/thread-self exists: the agent's first read comes before /proc is
// mounted.
func readMountTable(filter mountinfo.FilterFunc) ([]*mountinfo.Info, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read mount table: %w", err)
	}
	defer f.Close()
	mounts, err := mountinfo.GetMountsFromReader(f, filter)
	if err != nil {
		return nil, fmt.Errorf("read /proc/self/mountinfo: %w", err)
	}
	return mounts, nil
}
