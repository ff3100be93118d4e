package container

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/kiln-runtime/kiln/kernfs"
)

// forgetRetry and forgetFor pace and bound forgetRemoved: past virtio-fs's entry timeout (1 s with the default
// cache mode; a day with "always", for which the lookups see the removed directories until the bound), a lookup
// asks the host again.
const (
	forgetRetry = 1100 * time.Millisecond
	forgetFor   = 30 * time.Second
)

// removedPaths are the directories of the shared directory the host removes once container root (its root) and
// the bind sources released (no container uses them any more) are gone from the guest: the container's own
// directory and each released pod bind's.
func removedPaths(sharedDir, root string, released []string) []string {
	var paths []string
	own := filepath.Dir(root)
	for _, dir := range append([]string{own}, dirsOf(released)...) {
		if !strings.HasPrefix(dir, sharedDir+"/") || (dir != own && strings.HasPrefix(dir, own+"/")) || slices.Contains(paths, dir) {
			continue // not below the shared directory, or within the container's own directory
		}
		paths = append(paths, dir)
	}
	return paths
}

func dirsOf(paths []string) []string {
	dirs := make([]string, 0, len(paths))
	for _, p := range paths {
		dirs = append(dirs, filepath.Dir(p))
	}
	return dirs
}

// forgetRemoved makes the guest's kernel forget what it cached of paths once the host removed them: looked up past
// the entry timeout, a removed directory's entry is invalidated with every unused entry cached below it, and the
// kernel tells virtiofsd to forget their inodes. Until then virtiofsd holds a descriptor on each file the container
// looked up, and with them the host's detached root (an overlay): the disk space of its deleted writable layer and
// its image layers, one root for each container removed (kubelet restarts a container under a new id each time).
//
// The lookup does not reach everything: in about a third of the runs of integration/cri
// TestKilnPodForgetsRemovedContainers, one of its five removed containers kept its files cached, unused but out
// of the invalidation's reach, until the pod ended. So once the paths are gone and one more retry has passed, or
// once bound has (a cache mode that trusts entries for long keeps the paths in sight), drop has the kernel free
// the unused entries it caches (entryDropper).
func forgetRemoved(log *logrus.Entry, paths []string, retry, bound time.Duration, drop func(asked time.Time) error) {
	if len(paths) == 0 {
		return
	}
	deadline := time.Now().Add(bound)
	for len(paths) > 0 && !time.Now().After(deadline) {
		time.Sleep(retry)
		left := paths[:0]
		for _, p := range paths {
			if _, err := os.Lstat(p); !errors.Is(err, fs.ErrNotExist) {
				left = append(left, p)
			}
		}
		paths = left
	}
	if len(paths) > 0 {
		log.WithField("paths", paths).Debug("removed shared directories still in the guest's cache; their unused entries are dropped")
	} else {
		time.Sleep(retry)
	}
	if err := drop(time.Now()); err != nil {
		log.WithError(err).Warn("free the guest's unused file system entries after a container's removal")
	}
}

// entryDropper has the guest's kernel free the directory entries and inodes no one uses, with the data cached
// for them (vm.drop_caches): what a removed container looked up and the lookup of its directory left cached, and
// what the pod's live containers do not hold open, which they read again through virtio-fs when they next use it.
// Drops go one at a time, and a request that a drop begun after it covers is not carried out again: the requests
// made while one drop runs share the next.
type entryDropper struct {
	// write writes a value to the kernel's drop_caches (writeDropCaches).
	write func(value string) error

	mu sync.Mutex
	// quiet says the kernel was told to log no more drops.
	quiet bool
	// last is when the last drop began.
	last time.Time
}

// drop frees the unused entries, unless a drop that began after asked did.
func (d *entryDropper) drop(asked time.Time) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.last.After(asked) {
		return nil
	}
	if !d.quiet {
		// 4 has the kernel log no drop after this write's own line; it takes no value above 4 (6 is refused), so
		// it is a write of its own.
		if err := d.write("4"); err != nil {
			return err
		}
		d.quiet = true
	}
	began := time.Now()
	if err := d.write("2"); err != nil {
		return err // covers no request
	}
	d.last = began
	return nil
}

// writeDropCaches writes value to the kernel's vm.drop_caches.
func writeDropCaches(value string) error {
	const path = "/proc/sys/vm/drop_caches"
	if err := kernfs.Write(path, value); err != nil {
		return fmt.Errorf("vm.drop_caches = %s: %w", value, err)
	}
	return nil
}

// forget has the guest's kernel forget, in the background, what it cached of the directory of the container whose
// root is root and of the pod binds released (removedPaths), once the host removed them (forgetRemoved).
func (s *Service) forget(log *logrus.Entry, root string, released []string) {
	go forgetRemoved(log, removedPaths(s.cfg.SharedDir, root, released), forgetRetry, forgetFor, s.entries.drop)
}
