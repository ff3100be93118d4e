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
	infos, err := mountinfo.GetMounts(func(m *mountinfo.Info) (skip, stop bool) {
		return !Under(m.Mountpoint, dir), false
	})
	if err != nil {
		return nil, fmt.Errorf("read mountinfo: %w", err)
	}
	out := make([]string, 0, len(infos))
	for _, m := range infos {
		out = append(out, m.Mountpoint)
	}
	return out, nil
}

// UnmountUnder lazily unmounts every mount at or below dir, deepest first. Lazy (MNT_DETACH) because the guest,
// through virtiofsd, may still hold files open; the file systems go away when the last user does.
func UnmountUnder(dir string) error {
	// Detaching a mount also removes the copies propagated from it, so the list is re-read until it is empty.
	for round := 0; round < 8; round++ {
		mps, err := Points(dir)
		if err != nil {
			return fmt.Errorf("list mounts under %s: %w", dir, err)
		}
		if len(mps) == 0 {
			return nil
		}
		sort.Slice(mps, func(i, j int) bool { return strings.Count(mps[i], "/") > strings.Count(mps[j], "/") })
		for _, mp := range mps {
			err := unix.Unmount(mp, unix.MNT_DETACH|unix.UMOUNT_NOFOLLOW)
			if err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
				return fmt.Errorf("unmount %s: %w", mp, err)
			}
		}
	}
	return fmt.Errorf("mounts under %s keep reappearing", dir)
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
	var st unix.Statx_t
	if err := unix.Statx(unix.AT_FDCWD, path, unix.AT_SYMLINK_NOFOLLOW, unix.STATX_MNT_ID, &st); err != nil {
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
