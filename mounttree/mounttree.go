// Package mounttree owns what Kiln does to a directory tree that may hold mounts: list them, take them away,
// and remove the tree without ever crossing into a file system still mounted in it. A share's directories hold
// host data (volumes, root file systems) only through bind mounts; deleting through one would delete the host's
// files. It knows nothing of shares, pods or VMs.
package mounttree

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"
)

// Points lists the mount points of this mount namespace at or below dir.
func Points(dir string) ([]string, error) {
	infos, err := mountsUnder(dir)
	if err != nil {
		return nil, err
	}
	out := make([]string, 0, len(infos))
	for _, m := range infos {
		out = append(out, m.Mountpoint)
	}
	return out, nil
}

// mountsUnder reads the mounts of this mount namespace at or below dir.
func mountsUnder(dir string) ([]*mountinfo.Info, error) {
	infos, err := mountinfo.GetMounts(func(m *mountinfo.Info) (skip, stop bool) {
		return !Under(m.Mountpoint, dir), false
	})
	if err != nil {
		return nil, fmt.Errorf("read mountinfo: %w", err)
	}
	return infos, nil
}

// UnmountUnder lazily unmounts every mount at or below dir, deepest first. Lazy (MNT_DETACH) because the guest,
// through virtiofsd, may still hold files open; the file systems go away when the last user does.
//
// The mounts below a writable export lie under directories a running guest can rename and replace with symlinks
// between the listing and the unmount, and UMOUNT_NOFOLLOW guards only a path's last component: each mount point
// is opened beneath dir without following any symlink, checked to be the very mount listed, and unmounted
// through that descriptor, so an unmount never lands outside dir.
func UnmountUnder(dir string) error {
	// Detaching a mount also removes the copies propagated from it, so the list is re-read until it is empty.
	for round := 0; round < 8; round++ {
		infos, err := mountsUnder(dir)
		if err != nil {
			return fmt.Errorf("list mounts under %s: %w", dir, err)
		}
		if len(infos) == 0 {
			return nil
		}
		sort.Slice(infos, func(i, j int) bool {
			return strings.Count(infos[i].Mountpoint, "/") > strings.Count(infos[j].Mountpoint, "/")
		})
		if err := unmountRound(dir, infos); err != nil {
			return err
		}
	}
	return fmt.Errorf("mounts under %s keep reappearing (or lie where no path without symlinks reaches them)", dir)
}

// unmountRound unmounts each of infos that is still where it was listed, from dir opened afresh (a mount on dir
// itself that a round took away uncovers the one below it).
func unmountRound(dir string, infos []*mountinfo.Info) error {
	root, err := os.Open(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("unmount under %s: %w", dir, err)
	}
	defer root.Close()
	for _, m := range infos {
		if err := unmountBeneath(root, dir, m); err != nil {
			return err
		}
	}
	return nil
}

// Visible lists the mount points strictly below dir that dir's tree shows, in the order they were mounted: each
// one whose path, reached beneath dir without symlinks, is that very mount, not a mount made over it or over a
// directory above it since (mountinfo lists those it hides too).
func Visible(dir string) ([]string, error) {
	infos, err := mountsUnder(dir)
	if err != nil {
		return nil, err
	}
	root, err := os.Open(dir)
	if err != nil {
		return nil, err
	}
	defer root.Close()
	var points []string
	for _, m := range infos {
		if m.Mountpoint == dir {
			continue
		}
		if fd, ok := OpenBeneath(root, dir, m); ok {
			unix.Close(fd)
			points = append(points, m.Mountpoint)
		}
	}
	return points, nil
}

// OpenBeneath opens the root of mount m (as mountinfo listed it below dir) as an O_PATH descriptor, reached from
// root, an open directory at dir, without symlinks; false when that path no longer reaches m (moved, gone meanwhile,
// or a directory on the way swapped for a symlink where a guest can write): the mount point's path is only a
// name, which a guest that writes to a directory above it can redirect between the listing and its use.
func OpenBeneath(root *os.File, dir string, m *mountinfo.Info) (fd int, ok bool) {
	rel, err := filepath.Rel(dir, m.Mountpoint)
	if err != nil {
		return -1, false
	}
	fd, err = unix.Openat2(int(root.Fd()), rel, &unix.OpenHow{
		Flags:   unix.O_PATH | unix.O_CLOEXEC,
		Resolve: unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS,
	})
	if err != nil {
		return -1, false
	}
	if id, err := mountIDAt(fd, "", unix.AT_EMPTY_PATH); err != nil || id != uint64(m.ID) {
		unix.Close(fd)
		return -1, false // the path reaches another mount now
	}
	return fd, true
}

// unmountBeneath lazily unmounts m, reached from root (dir) without symlinks; a mount that path no longer reaches
// (moved, or gone meanwhile) is left for the next round's listing.
func unmountBeneath(root *os.File, dir string, m *mountinfo.Info) error {
	fd, ok := OpenBeneath(root, dir, m)
	if !ok {
		return nil
	}
	defer unix.Close(fd)
	// The descriptor's magic link names the mount's root itself, whatever has become of the path since.
	err := unix.Unmount(fmt.Sprintf("/proc/self/fd/%d", fd), unix.MNT_DETACH)
	if err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("unmount %s: %w", m.Mountpoint, err)
	}
	return nil
}

// RemoveTree removes dir and what is below it, like os.RemoveAll, but stops with an error at a mount point
// instead of deleting the mounted files: a share's directories hold host data only through mounts.
func RemoveTree(dir string) error {
	root, err := mountID(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	return removeBelow(dir, root)
}

// removeBelow removes path and what is below it, all on mount mnt. Whatever another remover takes away meanwhile
// is gone, as wanted: a dead shim's `delete` and a new pod's sweep can both remove the same VM's state.
func removeBelow(path string, mnt uint64) error {
	id, err := mountID(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if id != mnt {
		return fmt.Errorf("refusing to remove %s: a file system is still mounted there", path)
	}
	fi, err := os.Lstat(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if fi.IsDir() {
		entries, err := os.ReadDir(path)
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		if err != nil {
			return err
		}
		for _, e := range entries {
			if err := removeBelow(filepath.Join(path, e.Name()), mnt); err != nil {
				return err
			}
		}
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

// mountID is the id of the mount path is on (without following a final symlink). Unlike st_dev it tells a
// bind mount from the directory it is mounted on.
func mountID(path string) (uint64, error) {
	return mountIDAt(unix.AT_FDCWD, path, unix.AT_SYMLINK_NOFOLLOW)
}

// mountIDAt is statx's mount id of path relative to dirfd, with statx's flags.
func mountIDAt(dirfd int, path string, flags int) (uint64, error) {
	var st unix.Statx_t
	if err := unix.Statx(dirfd, path, flags, unix.STATX_MNT_ID, &st); err != nil {
		return 0, &os.PathError{Op: "statx", Path: path, Err: err}
	}
	if st.Mask&unix.STATX_MNT_ID == 0 {
		return 0, fmt.Errorf("statx %s: kernel reports no mount id", path)
	}
	return st.Mnt_id, nil
}

// Under reports whether path is dir or lies below it, lexically.
func Under(path, dir string) bool {
	if dir == "/" {
		return strings.HasPrefix(path, "/")
	}
	return path == dir || strings.HasPrefix(path, dir+"/")
}
