package share

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"
)

// bindFrom clones the mount of src (with the mounts below it when o.Recursive) and attaches the clone at target
// as a slave of the original. o.Readonly makes the clone's top mount read-only and leaves mounts below it as
// they are (an OCI "ro" bind, as runc does it); o.RecursiveReadonly makes every mount of the clone read-only
// (OCI "rro"); o.UIDMap and o.GIDMap idmap it. A clone can be idmapped only before it is attached, so it is done
// here, not on the mount point afterwards.
func bindFrom(src *os.File, target string, o BindOptions) error {
	var userns *os.File
	if o.UIDMap != "" || o.GIDMap != "" {
		if o.UIDMap == "" || o.GIDMap == "" {
			return fmt.Errorf("an idmapped bind of %s needs both uid and gid mappings, got uid %q and gid %q", src.Name(), o.UIDMap, o.GIDMap)
		}
		f, err := mount.GetUsernsFD(o.UIDMap, o.GIDMap)
		if err != nil {
			return fmt.Errorf("user namespace for uid mappings %s and gid mappings %s: %w", o.UIDMap, o.GIDMap, err)
		}
		defer f.Close()
		userns = f
	}
	flags := unix.OPEN_TREE_CLONE | unix.OPEN_TREE_CLOEXEC | unix.AT_EMPTY_PATH
	if o.Recursive {
		flags |= unix.AT_RECURSIVE
	}
	tree, err := unix.OpenTree(int(src.Fd()), "", uint(flags))
	if err != nil {
		return fmt.Errorf("clone mount tree of %s: %w", src.Name(), err)
	}
	defer unix.Close(tree)
	attr := unix.MountAttr{Propagation: unix.MS_SLAVE}
	what := "a slave"
	if o.RecursiveReadonly {
		attr.Attr_set = unix.MOUNT_ATTR_RDONLY
		what = "a read-only slave"
	}
	if err := unix.MountSetattr(tree, "", unix.AT_EMPTY_PATH|unix.AT_RECURSIVE, &attr); err != nil {
		return fmt.Errorf("make bind of %s %s: %w", src.Name(), what, err)
	}
	if o.Readonly && !o.RecursiveReadonly {
		top := unix.MountAttr{Attr_set: unix.MOUNT_ATTR_RDONLY}
		if err := unix.MountSetattr(tree, "", unix.AT_EMPTY_PATH, &top); err != nil {
			return fmt.Errorf("make bind of %s read-only: %w", src.Name(), err)
		}
	}
	if userns != nil {
		idmap := unix.MountAttr{Attr_set: unix.MOUNT_ATTR_IDMAP, Userns_fd: uint64(userns.Fd())}
		at := uint(unix.AT_EMPTY_PATH)
		if o.RecursiveIDMap {
			at |= unix.AT_RECURSIVE
		}
		if err := unix.MountSetattr(tree, "", at, &idmap); err != nil {
			return fmt.Errorf("idmap bind of %s: %w", src.Name(), err)
		}
	}
	if err := unix.MoveMount(tree, "", unix.AT_FDCWD, target, unix.MOVE_MOUNT_F_EMPTY_PATH); err != nil {
		return fmt.Errorf("attach bind of %s at %s: %w", src.Name(), target, err)
	}
	return nil
}

// mountPoints lists the mount points of this mount namespace at or below dir.
func mountPoints(dir string) ([]string, error) {
	infos, err := mountinfo.GetMounts(func(m *mountinfo.Info) (skip, stop bool) {
		return !under(m.Mountpoint, dir), false
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

// unmountUnder lazily unmounts every mount at or below dir, deepest first. Lazy (MNT_DETACH) because the guest,
// through virtiofsd, may still hold files open; the file systems go away when the last user does.
func unmountUnder(dir string) error {
	// Detaching a mount also removes the copies propagated from it, so the list is re-read until it is empty.
	for round := 0; round < 8; round++ {
		mps, err := mountPoints(dir)
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

// removeTree removes dir and what is below it, like os.RemoveAll, but stops with an error at a mount point
// instead of deleting the mounted files: a share's directories hold host data only through mounts.
func removeTree(dir string) error {
	root, err := mountID(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	return removeBelow(dir, root)
}

func removeBelow(path string, mnt uint64) error {
	id, err := mountID(path)
	if err != nil {
		return err
	}
	if id != mnt {
		return fmt.Errorf("refusing to remove %s: a file system is still mounted there", path)
	}
	fi, err := os.Lstat(path)
	if err != nil {
		return err
	}
	if fi.IsDir() {
		entries, err := os.ReadDir(path)
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
