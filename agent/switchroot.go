package agent

import (
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"
)

// rootStage is a directory of the initramfs that exists only while LeaveInitramfs runs.
const rootStage = "/.kiln-root"

// LeaveInitramfs makes the guest's root a mount of its own, a bind of the initramfs moved over it, and enters it:
// switch_root without copying anything. The kernel's initial root file system is mounted on nothing, and
// pivot_root(2) cannot move away from such a root, so containers would have to be entered with MS_MOVE and
// chroot, which a process holding CAP_SYS_CHROOT leaves with a second chroot and a walk up "..": it would find
// the guest's own files under its root (issue 11, finding 13). With a root that is mounted on something, runc
// pivots into the container's root and detaches the guest's tree from the container's mount namespace. It must
// run first, before anything is mounted (so before /proc is: the file system type tells the initramfs, a ramfs or
// tmpfs); a root of another type is left alone.
func LeaveInitramfs() error {
	var st unix.Statfs_t
	if err := unix.Statfs("/", &st); err != nil {
		return fmt.Errorf("leave the initramfs: statfs /: %w", err)
	}
	if st.Type != unix.RAMFS_MAGIC && st.Type != unix.TMPFS_MAGIC {
		return nil
	}
	if err := os.Mkdir(rootStage, 0o700); err != nil {
		return fmt.Errorf("leave the initramfs: %w", err)
	}
	steps := []struct {
		what string
		do   func() error
	}{
		{"bind / on " + rootStage, func() error { return unix.Mount("/", rootStage, "", unix.MS_BIND, "") }},
		{"enter " + rootStage, func() error { return unix.Chdir(rootStage) }},
		{"move it onto /", func() error { return unix.Mount(".", "/", "", unix.MS_MOVE, "") }},
		{"make it the root", func() error { return unix.Chroot(".") }},
		{"enter the new root", func() error { return unix.Chdir("/") }},
	}
	for _, s := range steps {
		if err := s.do(); err != nil {
			return fmt.Errorf("leave the initramfs: %s: %w", s.what, err)
		}
	}
	// The new root is the same file system: the stage directory is there too, now empty.
	if err := os.Remove(rootStage); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("leave the initramfs: remove %s: %w", rootStage, err)
	}
	return nil
}

// RootCanPivot says whether pivot_root(2) can move away from the visible root: whether that mount is mounted on
// another one. The kernel's initial root file system is the one mount that is not (its parent is itself).
func RootCanPivot() (bool, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return false, fmt.Errorf("read mount table: %w", err)
	}
	defer f.Close()
	return rootCanPivot(f)
}

// rootCanPivot is RootCanPivot on a mount table in /proc/<pid>/mountinfo's form.
func rootCanPivot(mountinfoTable io.Reader) (bool, error) {
	roots, err := mountinfo.GetMountsFromReader(mountinfoTable, func(m *mountinfo.Info) (skip, stop bool) {
		return m.Mountpoint != "/", false
	})
	if err != nil {
		return false, fmt.Errorf("read mount table: %w", err)
	}
	if len(roots) == 0 {
		return false, nil
	}
	// The last of the mounts on "/" is the visible one.
	r := roots[len(roots)-1]
	return r.Parent != r.ID, nil
}
