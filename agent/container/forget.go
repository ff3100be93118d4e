package container

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/sirupsen/logrus"
)

// forgetRetry and forgetFor pace and bound forgetRemoved: past virtio-fs's entry timeout (1 s with the default
// cache mode; a day with "always", for which the guest keeps the entries until memory is short), a lookup asks
// the host again.
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
// The lookup does not reach everything: about one removal in four under TCG still left the container's files
// cached, unused but out of the invalidation's reach, until the pod ended (integration/cri
// TestKilnPodForgetsRemovedContainers). So once the paths are gone and one more retry has passed, drop has the
// kernel free the unused entries it caches (dropUnusedEntries); the pod's live containers look up what they use
// again.
func forgetRemoved(log *logrus.Entry, paths []string, retry, bound time.Duration, drop func() error) {
	if len(paths) == 0 {
		return
	}
	deadline := time.Now().Add(bound)
	for len(paths) > 0 {
		time.Sleep(retry)
		left := paths[:0]
		for _, p := range paths {
			if _, err := os.Lstat(p); !errors.Is(err, fs.ErrNotExist) {
				left = append(left, p)
			}
		}
		paths = left
		if len(paths) > 0 && time.Now().After(deadline) {
			log.WithField("paths", paths).Debug("removed shared directories still there; the guest forgets them when its memory is short")
			return
		}
	}
	time.Sleep(retry)
	if err := drop(); err != nil {
		log.WithError(err).Warn("free the guest's unused file system entries of a removed container")
	}
}

// dropUnusedEntries has the guest's kernel free the directory entries and inodes no one uses (vm.drop_caches 2; 4
// keeps the kernel from logging it each time).
func dropUnusedEntries() error {
	return os.WriteFile("/proc/sys/vm/drop_caches", []byte("6"), 0)
}

// forget has the guest's kernel forget, in the background, what it cached of the directory of the container whose
// root is root and of the pod binds released (removedPaths), once the host removed them (forgetRemoved).
func (s *Service) forget(log *logrus.Entry, root string, released []string) {
	go forgetRemoved(log, removedPaths(s.cfg.SharedDir, root, released), forgetRetry, forgetFor, dropUnusedEntries)
}
