package container

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// DefaultRootsDir is where the agent layers read-only roots (readOnlyRoot).
const DefaultRootsDir = "/run/kiln/roots"

// layerLimits bound a read-only root's upper layer: it takes only the mount points libcontainer makes before the
// root becomes read-only, and the guest's memory backs it.
const layerLimits = "mode=0711,size=1m,nr_inodes=4096"

// readOnlyRoot is the root the guest gives a container whose spec asks for a read-only one. The host exports such
// a root read-only, so that a guest kernel taken over cannot write the host's directory (a plain directory may be
// every pod's root) or the container's writable layer. libcontainer still makes the mount points the spec needs
// in the root before it remounts the root read-only (a pause image has no /proc), as runc does on a host; here
// they go into an overlay whose upper layer is a small tmpfs of the guest's, above the read-only export.
type readOnlyRoot struct {
	// dir is the tmpfs holding the overlay's upper and work directories and its mount point, root.
	dir string
	// lower is the read-only export in the shared directory.
	lower string
}

// newReadOnlyRoot says where container id's read-only root over lower is layered, under rootsDir; it mounts
// nothing yet.
func newReadOnlyRoot(rootsDir, id, lower string) (*readOnlyRoot, error) {
	if id == "" || id == "." || id == ".." || strings.ContainsAny(id, "/\x00") {
		return nil, fmt.Errorf("container id %q cannot name a directory", id)
	}
	return &readOnlyRoot{dir: filepath.Join(rootsDir, id), lower: lower}, nil
}

// root is the container's root: the overlay's mount point.
func (r *readOnlyRoot) root() string { return filepath.Join(r.dir, "root") }

// mount mounts a tmpfs at dir and in it an overlay of the read-only export under an upper layer of the tmpfs. On
// error nothing of it is left.
func (r *readOnlyRoot) mount() (retErr error) {
	// runc resolves the root as the container's root, which in a user namespace is not the guest's root: the
	// way to it must let anyone pass through (as MountShared makes the share's).
	if err := os.MkdirAll(filepath.Dir(r.dir), 0o711); err != nil {
		return fmt.Errorf("layer read-only root: %w", err)
	}
	if err := os.Chmod(filepath.Dir(r.dir), 0o711); err != nil {
		return fmt.Errorf("layer read-only root: %w", err)
	}
	if err := os.Mkdir(r.dir, 0o711); err != nil {
		return fmt.Errorf("layer read-only root: %w", err)
	}
	if err := unix.Mount("tmpfs", r.dir, "tmpfs", 0, layerLimits); err != nil {
		_ = os.Remove(r.dir)
		return fmt.Errorf("layer read-only root: mount tmpfs at %s: %w", r.dir, err)
	}
	defer func() {
		if retErr != nil {
			if err := r.remove(); err != nil {
				retErr = errors.Join(retErr, err)
			}
		}
	}()
	for _, d := range []string{"upper", "work", "root"} {
		if err := os.Mkdir(filepath.Join(r.dir, d), 0o755); err != nil {
			return fmt.Errorf("layer read-only root: %w", err)
		}
	}
	// The directories go to overlayfs as descriptors: a host-chosen rootfs path may hold the ',' and ':' its
	// options split on. Opening the export follows its virtio-fs submount.
	fds := make([]int, 0, 3)
	defer func() {
		for _, fd := range fds {
			_ = unix.Close(fd)
		}
	}()
	for _, p := range []string{r.lower, filepath.Join(r.dir, "upper"), filepath.Join(r.dir, "work")} {
		fd, err := unix.Open(p, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("layer read-only root: open %s: %w", p, err)
		}
		fds = append(fds, fd)
	}
	// The overlay's root takes its owner and mode from the upper directory: it gets the export's, so that the
	// image's root (owned by a user namespace's mapped root, for one) stays as it is.
	var st unix.Stat_t
	if err := unix.Fstat(fds[0], &st); err != nil {
		return fmt.Errorf("layer read-only root: stat %s: %w", r.lower, err)
	}
	upper := filepath.Join(r.dir, "upper")
	if err := os.Chown(upper, int(st.Uid), int(st.Gid)); err != nil {
		return fmt.Errorf("layer read-only root: %w", err)
	}
	if err := unix.Chmod(upper, st.Mode&0o7777); err != nil {
		return fmt.Errorf("layer read-only root: chmod %s: %w", upper, err)
	}
	opts := fmt.Sprintf("lowerdir=/proc/self/fd/%d,upperdir=/proc/self/fd/%d,workdir=/proc/self/fd/%d", fds[0], fds[1], fds[2])
	if err := unix.Mount("overlay", r.root(), "overlay", 0, opts); err != nil {
		return fmt.Errorf("layer read-only root over %s: mount overlay: %w", r.lower, err)
	}
	return nil
}

// remove unmounts the overlay and its tmpfs and removes dir. Copies a container's mount namespace still holds go
// with them (detached). The export's virtio-fs submount, which opening it mounted in the agent's namespace, goes
// too: it would keep virtiofsd's hold on the host's root after a failed create, which nothing looks up again.
func (r *readOnlyRoot) remove() error {
	var errs []error
	if err := unix.Unmount(r.root(), unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		errs = append(errs, fmt.Errorf("unmount read-only root %s: %w", r.root(), err))
	}
	if err := unix.Unmount(r.lower, unix.MNT_DETACH|unix.UMOUNT_NOFOLLOW); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		errs = append(errs, fmt.Errorf("unmount read-only root's export %s: %w", r.lower, err))
	}
	if err := unix.Unmount(r.dir, unix.MNT_DETACH); err != nil {
		errs = append(errs, fmt.Errorf("unmount read-only root's layer %s: %w", r.dir, err))
	}
	if err := os.Remove(r.dir); err != nil {
		errs = append(errs, fmt.Errorf("remove read-only root's directory: %w", err))
	}
	return errors.Join(errs...)
}
