package container

import (
	"errors"
	"os"
	"slices"
	"strings"
	"sync"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"
)

// The host exports a bind source once for all the pod's containers that bind it (runtime/share's podBind), as a
// virtio-fs submount, which the guest's kernel mounts on first access, in the mount namespace of the process that
// reaches it, with a superblock of its own. Left to each container's runc, which reaches it in the container's new
// namespace, two containers binding one volume would get two file systems, each with its own inodes, locks,
// inotify watches and cache. So the agent mounts it first, in its own namespace, which every container's is copied
// from, and holds it while a container that binds it exists: once the last is removed it unmounts it, so that the
// host's removal of the export leaves nothing of it in the guest.

// sharedSources are spec's bind sources in the shared directory, once each: the host points a bind mount's
// source there (runtime/share), and no other mount's.
func sharedSources(spec *specs.Spec, sharedDir string) []string {
	var srcs []string
	for _, m := range spec.Mounts {
		if strings.HasPrefix(m.Source, sharedDir+"/") && !slices.Contains(srcs, m.Source) {
			srcs = append(srcs, m.Source)
		}
	}
	return srcs
}

// sharedMounts counts the containers that use each bind source the agent mounted.
type sharedMounts struct {
	mu    sync.Mutex
	users map[string]int
	// unmount detaches a mount; nil is unix.Unmount with MNT_DETACH (tests record the order instead).
	unmount func(path string) error
}

// acquire mounts each source not mounted yet (opening it mounts it; stat does not, acting as with
// AT_NO_AUTOMOUNT) and counts one more user of each. An error is runc's to report, when it binds the source.
func (m *sharedMounts) acquire(log *logrus.Entry, srcs []string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.users == nil {
		m.users = map[string]int{}
	}
	for _, src := range srcs {
		if m.users[src] == 0 {
			if f, err := os.Open(src); err == nil {
				_ = f.Close()
			} else {
				log.WithError(err).WithField("source", src).Debug("open a shared bind source")
			}
		}
		m.users[src]++
	}
}

// release counts one user less of each source, and unmounts those no container uses any more. A source that is no
// mount point (a file, which the guest does not mount on its own) is not an error. Sources below others go first: detaching a parent first would leave its mount point to be crossed on the way to
// the child, which mounts the parent again (the host's export is still there).
func (m *sharedMounts) release(log *logrus.Entry, srcs []string) (released []string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	unmount := m.unmount
	if unmount == nil {
		unmount = func(path string) error { return unix.Unmount(path, unix.MNT_DETACH|unix.UMOUNT_NOFOLLOW) }
	}
	srcs = slices.Clone(srcs)
	slices.SortFunc(srcs, func(a, b string) int { return strings.Count(b, "/") - strings.Count(a, "/") })
	for _, src := range srcs {
		if m.users[src]--; m.users[src] > 0 {
			continue
		}
		delete(m.users, src)
		released = append(released, src)
		if err := unmount(src); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
			log.WithError(err).WithField("source", src).Warn("unmount a shared bind source no container uses")
		}
	}
	return released
}
