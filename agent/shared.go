package agent

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
)

// The host's per-VM shared directory (virtio-fs).
const (
	// SharedTag is the virtio-fs tag the host exports the directory under.
	SharedTag = agentv1.SharedFSTag
	// SharedDir is where the guest mounts it; containers' roots are below.
	SharedDir = agentv1.GuestSharedDir
)

// MountShared mounts the host's shared directory at dir when the host
// exported one under tag. A guest without it (no virtio-fs device, or none
// with that tag) still boots: that is reported as (false, nil).
func MountShared(log *logrus.Entry, tag, dir string) (bool, error) {
	if mounted, err := isMountPoint(dir); err == nil && mounted {
		return true, nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return false, fmt.Errorf("create shared directory mount point %s: %w", dir, err)
	}
	// runc resolves a container's root (and its pod shm, beside the share) as the container's root, which in a
	// user namespace is not the guest's root: the agent's directory (which other code may have created 0700 for
	// its own state) must let anyone pass through.
	if err := os.Chmod(filepath.Dir(dir), 0o711); err != nil {
		return false, fmt.Errorf("open %s to containers with a user namespace: %w", filepath.Dir(dir), err)
	}
	// Set-uid files work, as in a runc container's root (an image's ping or sudo; CRI's no_new_privs=false
	// relies on it): the guest kernel, not the mount, is the boundary. Device nodes on the share would name
	// guest devices, and containers get their own /dev: nodev stays.
	err := unix.Mount(tag, dir, "virtiofs", unix.MS_NODEV, "")
	// The kernel answers EINVAL for an unknown tag, ENODEV when virtiofs
	// is not there at all, ENOENT on some kernels for a missing device.
	if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENODEV) || errors.Is(err, unix.ENOENT) {
		log.WithField("tag", tag).Debug("no shared directory")
		_ = os.Remove(dir)
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("mount virtiofs %s on %s: %w", tag, dir, err)
	}
	// Host mounts made under the share after boot must show up in the
	// containers' bind mounts, which libcontainer makes rslave by default.
	if err := unix.Mount("", dir, "", unix.MS_SHARED|unix.MS_REC, ""); err != nil {
		log.WithError(err).Warn("make shared directory a shared mount")
	}
	log.WithFields(logrus.Fields{"tag": tag, "dir": dir}).Info("shared directory mounted")
	return true, nil
}
