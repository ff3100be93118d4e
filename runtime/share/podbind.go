package share

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/kiln-runtime/kiln/mounttree"
)

// podBinds is the directory, under mounts/, of the pod's bind sources. No container id starts with '_'.
const podBinds = "_binds"

// A pod's containers that bind the same host source get the same export of it, as runc's get the same inode: in
// the guest each export is a file system of its own (a virtio-fs submount), so with one export per container two
// containers sharing a volume (an emptyDir between an app and its sidecar) would not see each other's locks or
// inotify events, and would read each other's writes only once the guest's cache revalidated, a second later.
// An export serves every container that asks for the source with the same options, and a read-only request
// takes a read-write export of it when there is one: the guest makes that container's mount read-only, and the
// guest can write the source through the other container's mount anyway. A source only ever asked for read-only
// stays read-only on the host.

// podBind is one export of a bind source, and the containers that use it.
type podBind struct {
	// rel is its path relative to the share: podBinds/<n>/<base>.
	rel   string
	users map[string]bool
}

// bindKey is what a bind source is (its file, and the host mount it was reached through, whose flags and the
// mounts below it the export takes) and how it is exported.
type bindKey struct {
	dev, ino, mnt uint64
	opts          BindOptions
}

// bindKeyOf is the key of the opened source f, whose stat is fi.
func bindKeyOf(f *os.File, fi os.FileInfo, opts BindOptions) (bindKey, error) {
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return bindKey{}, errors.New("no device and inode numbers for the source")
	}
	var stx unix.Statx_t
	if err := unix.Statx(int(f.Fd()), "", unix.AT_EMPTY_PATH, unix.STATX_MNT_ID, &stx); err != nil {
		return bindKey{}, fmt.Errorf("mount of the source: %w", err)
	}
	if stx.Mask&unix.STATX_MNT_ID == 0 {
		return bindKey{}, errors.New("mount of the source: the kernel does not tell it (Linux 5.8 or later does)")
	}
	return bindKey{dev: st.Dev, ino: st.Ino, mnt: stx.Mnt_id, opts: opts}, nil
}

// reusableBindLocked is the export a container asking for key may use: for a read-only request a read-write one
// made with otherwise the same options, first, since a container that writes shares it; else the one made with
// the same options; nil for none.
func (s *Share) reusableBindLocked(key bindKey) *podBind {
	if key.opts.Readonly {
		rw := key
		rw.opts.Readonly = false
		if b, ok := s.binds[rw]; ok {
			return b
		}
	}
	return s.binds[key]
}

// releaseBindsLocked ends container id's use of the pod's exports, unmounting and removing each no container uses
// any more.
func (s *Share) releaseBindsLocked(id string) error {
	var errs []error
	for key, b := range s.binds {
		if !b.users[id] {
			continue
		}
		delete(b.users, id)
		if len(b.users) > 0 {
			continue
		}
		delete(s.binds, key)
		// Unmounting under mounts/ propagates to shared/; under shared/ too catches a copy the propagation
		// missed (none is expected).
		dir := filepath.Dir(b.rel)
		var err error
		for _, d := range []string{filepath.Join(s.mounts, dir), filepath.Join(s.shared, dir)} {
			if err = mounttree.UnmountUnder(d); err != nil {
				break
			}
		}
		if err == nil {
			err = mounttree.RemoveTree(filepath.Join(s.mounts, dir))
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("remove bind source %s: %w", b.rel, err))
		}
	}
	return errors.Join(errs...)
}
