// Package share owns the host side of a VM's shared directory: the per-VM tree that virtiofsd exports to the
// guest, the container root file systems and bind-mount sources mounted into it, and their removal. It knows
// nothing of the VMM, of virtiofsd or of the agent; it only knows the path the guest mounts the share at.
//
// Layout of a share at dir:
//
//	dir/                           a bind of itself, unbindable (and so private)
//	dir/mounts/                    private to Kiln: everything is mounted here (a tmpfs of directories)
//	dir/mounts/<id>/rootfs         a container's root file system
//	dir/mounts/_binds/<n>/<b>      bind-mount sources, each once per pod (podBind)
//	dir/shared/                    what virtiofsd exports: a read-only slave bind of mounts/
//
// Nothing mounted in the share reaches the host's other mount namespaces, and a recursive bind of a directory
// above it leaves it out. mounts/ is in its own shared peer group, and shared/ a slave of that group, so
// every mount Kiln makes under mounts/ after the VM started propagates to shared/ (and from there into
// virtiofsd's mount namespace, whose mounts are slaves of the host's) while nothing mounted under shared/, nor
// anything else on the host, flows back. shared/ itself is read-only: the guest cannot add entries next to the
// containers; the mounts inside keep their own read-only or read-write flag. The copy of a host directory a
// rootfs or bind source is mounted from is a slave of the host's mount: what the host mounts there later reaches
// the guest, and what the share mounts or unmounts on the copy never reaches the host.
package share

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"

	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"

	"github.com/kiln-runtime/kiln/mounttree"
	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
)

// GuestDir is where the guest mounts the share (the virtio-fs device's tag is the VMM's business).
const GuestDir = agentv1.GuestSharedDir

// idPattern is what containerd and runc accept as a container id, at most one path component long (255 bytes).
var idPattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,254}$`)

// Share is one VM's shared directory. Its methods are safe for concurrent use.
type Share struct {
	dir    string // resolved, so it matches mount points in /proc/self/mountinfo
	mounts string
	shared string

	mu         sync.Mutex
	containers map[string]*container
	// writable are the real paths of the host directories this share ever exported read-write. The guest can
	// create symlinks in them, and those outlive the container the directory was exported for (the guest does
	// too), so they are kept until the share closes: later sources reaching them are resolved beneath them.
	writable []string
	// binds are the bind sources shared, by what they are and how (podBind).
	binds    map[bindKey]*podBind
	nextBind int
	closed   bool
}

// container is what a container added to the share.
type container struct {
	rootfs bool
}

// New creates the share at dir, which must not exist (its parent must). On error nothing is left behind.
func New(dir string) (_ *Share, retErr error) {
	if err := os.Mkdir(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create share %s: %w", dir, err)
	}
	real, err := filepath.EvalSymlinks(dir)
	if err != nil {
		_ = os.Remove(dir)
		return nil, fmt.Errorf("create share %s: resolve: %w", dir, err)
	}
	s := &Share{
		dir:        real,
		mounts:     filepath.Join(real, "mounts"),
		shared:     filepath.Join(real, "shared"),
		containers: map[string]*container{},
		binds:      map[bindKey]*podBind{},
	}
	defer func() {
		if retErr != nil {
			if err := Remove(s.dir); err != nil {
				retErr = fmt.Errorf("%w (and cleaning up: %v)", retErr, err)
			}
		}
	}()
	// The guest sees mounts/ as the root of its virtio-fs. Anyone may pass through it (not list it): runc in
	// the guest resolves a container's root, <share>/<id>/rootfs, as the container's root, which in a user
	// namespace is not the guest's root (containerd opens a runc bundle's directory to the mapped root for the
	// same reason). On the host the share's own directory stays 0700.
	for _, d := range []string{s.mounts, s.shared} {
		if err := os.Mkdir(d, 0o711); err != nil {
			return nil, fmt.Errorf("create share %s: %w", dir, err)
		}
	}
	steps := []struct {
		what                      string
		source, target, typ, data string
		flags                     uintptr
	}{
		// The share is a mount of its own, unbindable, which is private as well. Private: nothing mounted in it
		// spreads to the peers of the file system it lies in (on systemd hosts "/" is shared, and the mount
		// namespaces of services are its slaves), where each container's mounts would be copied and could
		// outlive the share. Unbindable: a recursive bind of a directory above it (a hostPath of / or /run)
		// leaves it out, where it copied every pod's share into the bind, and each such copy into the next.
		{what: "bind the share onto itself", source: s.dir, target: s.dir, flags: unix.MS_BIND},
		{what: "make the share unbindable", target: s.dir, flags: unix.MS_UNBINDABLE},
		// A file system of its own, not a bind: nothing can be bound from within an unbindable mount. It holds
		// the directories the containers' file systems are mounted on, and is shared in a group of its own.
		{what: "mount mounts/", source: "kiln-share", target: s.mounts, typ: "tmpfs", data: "mode=0711,size=1m",
			flags: unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC},
		{what: "make mounts/ shared", target: s.mounts, flags: unix.MS_SHARED},
		{what: "bind mounts/ onto shared/", source: s.mounts, target: s.shared, flags: unix.MS_BIND},
		{what: "make shared/ a slave", target: s.shared, flags: unix.MS_SLAVE},
		{what: "make shared/ read-only", target: s.shared, flags: unix.MS_REMOUNT | unix.MS_BIND | unix.MS_RDONLY},
	}
	for _, st := range steps {
		if err := unix.Mount(st.source, st.target, st.typ, st.flags, st.data); err != nil {
			return nil, fmt.Errorf("create share %s: %s: %w", dir, st.what, err)
		}
	}
	return s, nil
}

// Dir is the share's directory.
func (s *Share) Dir() string { return s.dir }

// ExportDir is the directory to export to the guest (virtiofsd's source).
func (s *Share) ExportDir() string { return s.shared }

// GuestPath is where a path relative to the share (as AddRootfs returns) appears in the guest.
func GuestPath(rel string) string { return GuestDir + "/" + rel }

// Close unmounts everything in the share and removes its directory. The share is unusable afterwards; a second
// Close does nothing.
func (s *Share) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil
	}
	s.closed = true
	s.containers = nil
	if err := Remove(s.dir); err != nil {
		return fmt.Errorf("close share %s: %w", s.dir, err)
	}
	return nil
}

// Remove unmounts everything at or below dir and removes dir, refusing to delete through anything still mounted.
// It is how a share left behind by a Kiln process that died is cleaned up; a missing dir is not an error.
func Remove(dir string) error {
	real, err := filepath.EvalSymlinks(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("remove share %s: %w", dir, err)
	}
	if err := mounttree.UnmountUnder(real); err != nil {
		return fmt.Errorf("remove share %s: %w", dir, err)
	}
	if err := mounttree.RemoveTree(real); err != nil {
		return fmt.Errorf("remove share %s: %w", dir, err)
	}
	return nil
}

// RemoveContainer unmounts a container's root file system and bind sources and removes its directory.
// Removing an unknown container is not an error.
func (s *Share) RemoveContainer(ctx context.Context, containerID string) error {
	if err := CheckID(containerID); err != nil {
		return fmt.Errorf("remove container from share: %w", err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return fmt.Errorf("remove container %s from share: share is closed", containerID)
	}
	delete(s.containers, containerID)
	// An export that cannot be removed now goes with the share; the container's own directory goes anyway.
	if err := errors.Join(s.releaseBindsLocked(containerID), s.removeContainerDirLocked(containerID)); err != nil {
		return fmt.Errorf("remove container %s from share: %w", containerID, err)
	}
	return nil
}

// removeContainerDirLocked unmounts what is under the container's directory and removes it.
func (s *Share) removeContainerDirLocked(containerID string) error {
	dir := filepath.Join(s.mounts, containerID)
	if _, err := os.Lstat(dir); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	// Unmounting under mounts/ propagates to shared/; unmounting under shared/ too catches a copy the
	// propagation missed (none is expected), so nothing pins the container's files.
	for _, d := range []string{dir, filepath.Join(s.shared, containerID)} {
		if err := mounttree.UnmountUnder(d); err != nil {
			return err
		}
	}
	return mounttree.RemoveTree(dir)
}

// CheckID refuses a container id that is not one path component of the characters containerd and runc allow:
// the id names the container's directories in the share.
func CheckID(id string) error {
	if !idPattern.MatchString(id) {
		return fmt.Errorf("container id %q: want letters, digits, '_', '.' and '-', starting with a letter or digit", id)
	}
	return nil
}

// containerLocked returns the container's record, creating it and its directory.
func (s *Share) containerLocked(id string) (*container, error) {
	if s.closed {
		return nil, errors.New("share is closed")
	}
	if err := CheckID(id); err != nil {
		return nil, err
	}
	if c, ok := s.containers[id]; ok {
		return c, nil
	}
	if err := os.Mkdir(filepath.Join(s.mounts, id), 0o755); err != nil && !errors.Is(err, os.ErrExist) {
		return nil, fmt.Errorf("create container directory: %w", err)
	}
	c := &container{}
	s.containers[id] = c
	return c, nil
}

// Tmpfs lists the tmpfs file systems the share exports to the guest writable (bind sources, and the mounts below
// an rbind's), each once, with its size in bytes: host memory the guest can fill through virtio-fs, which the
// host charges to virtiofsd, where under runc it would be charged to the container that wrote it. Read-only
// exports (a Kubernetes pod's secret and token volumes) are left out, and a tmpfs without a size (size=0) has
// size 0.
func (s *Share) Tmpfs() (map[Device]int64, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	infos, err := mountinfo.GetMounts(func(m *mountinfo.Info) (skip, stop bool) {
		writable := slices.Contains(strings.Split(m.Options, ","), "rw")
		return m.FSType != "tmpfs" || !writable || !mounttree.Under(m.Mountpoint, s.mounts) || m.Mountpoint == s.mounts, false
	})
	if err != nil {
		return nil, fmt.Errorf("share %s: list its tmpfs mounts: %w", s.dir, err)
	}
	return s.tmpfsSizesLocked(infos)
}

// tmpfsSizesLocked sizes the tmpfs mounts infos lists under the share's mounts/, each device once.
func (s *Share) tmpfsSizesLocked(infos []*mountinfo.Info) (map[Device]int64, error) {
	sizes := map[Device]int64{}
	if len(infos) == 0 {
		return sizes, nil
	}
	root, err := os.Open(s.mounts)
	if err != nil {
		return nil, fmt.Errorf("share %s: list its tmpfs mounts: %w", s.dir, err)
	}
	defer root.Close()
	for _, m := range infos {
		dev := Device{Major: m.Major, Minor: m.Minor}
		if _, seen := sizes[dev]; seen {
			continue
		}
		// Reached without symlinks, and checked to be the mount listed: a guest that writes to a directory above it
		// could otherwise point the path at a host tmpfs of its choosing (/dev/shm), whose size would be added to
		// its VM's memory limit.
		fd, ok := mounttree.OpenBeneath(root, s.mounts, m)
		if !ok {
			continue // gone since the list was read (a host's unmount reaching the share's copy), or moved
		}
		var st unix.Statfs_t
		err := unix.Fstatfs(fd, &st)
		unix.Close(fd)
		if err != nil {
			return nil, fmt.Errorf("share %s: size of the tmpfs at %s: %w", s.dir, m.Mountpoint, err)
		}
		if st.Type != unix.TMPFS_MAGIC {
			continue
		}
		sizes[dev] = int64(st.Blocks) * st.Bsize
	}
	return sizes, nil
}

// Device is a file system's device numbers.
type Device struct{ Major, Minor int }
