package share

import (
	"errors"
	"fmt"
	"os"

	"github.com/containerd/containerd/v2/core/mount"
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
	if errors.Is(err, unix.EINVAL) {
		// EINVAL also comes from a source in another mount namespace, or below a locked mount: "may".
		return fmt.Errorf("clone mount tree of %s: %w: it may be in an unbindable mount (a Kiln VM's share is one: bind a "+
			"directory outside it)", src.Name(), err)
	}
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
