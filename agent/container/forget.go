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
// the entry timeout, a removed directory's entry is invalidated with every entry cached below it, and the kernel
// tells virtiofsd to forget their inodes. Until then virtiofsd holds a descriptor on each file the container looked
// up, and with them the host's detached root (an overlay): the disk space of its deleted writable layer and its
// image layers, one root for each container removed (kubelet restarts a container under a new id each time).
func forgetRemoved(log *logrus.Entry, paths []string, retry, bound time.Duration) {
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
		if time.Now().After(deadline) {
			if len(paths) > 0 {
				log.WithField("paths", paths).Debug("removed shared directories still there; the guest forgets them when its memory is short")
			}
			return
		}
	}
}
