package share

import (
	"context"
	"fmt"
	"os"
	"slices"
	"strings"

	"golang.org/x/sys/unix"
)

// Mount is one file system mount the way containerd's snapshotters describe a root file system (its
// mount.Mount): mounted, in order, on the same target.
type Mount struct {
	Type    string
	Source  string
	Options []string
}

// AddRootfsMounts mounts a container's root file system from mounts (an overlay of snapshot layers, a bind...)
// at "<id>/rootfs" in the share and returns that relative path. readonly adds "ro" to every mount.
func (s *Share) AddRootfsMounts(ctx context.Context, containerID string, mounts []Mount, readonly bool) (guestRel string, err error) {
	if len(mounts) == 0 {
		return "", fmt.Errorf("add rootfs of container %s to share: no mounts", containerID)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	c, target, err := s.prepareRootfsLocked(containerID, "")
	if err != nil {
		return "", fmt.Errorf("add rootfs of container %s to share: %w", containerID, err)
	}
	for i, m := range mounts {
		if err := mountOne(m, target, readonly); err != nil {
			_ = unmountUnder(target)
			_ = os.Remove(target)
			return "", fmt.Errorf("add rootfs of container %s to share: mount %d (%s %s): %w", containerID, i, m.Type, m.Source, err)
		}
	}
	c.rootfs = true
	return containerID + "/rootfs", nil
}

func mountOne(m Mount, target string, readonly bool) error {
	flags, data := parseOptions(m.Options)
	if readonly {
		flags |= unix.MS_RDONLY
	}
	if m.Type == "bind" || flags&unix.MS_BIND != 0 {
		src, _, err := Source{Path: m.Source}.open()
		if err != nil {
			return err
		}
		defer src.Close()
		return bindFrom(src, target, BindOptions{RecursiveReadonly: flags&unix.MS_RDONLY != 0, Recursive: flags&unix.MS_REC != 0})
	}
	if err := unix.Mount(m.Source, target, m.Type, flags, data); err != nil {
		return fmt.Errorf("mount %s: %w", m.Type, err)
	}
	return nil
}

// mountFlags are the options mount(8) turns into flags; each sets (true) or clears (false) its flag.
var mountFlags = map[string]struct {
	set  bool
	flag uintptr
}{
	"ro": {true, unix.MS_RDONLY}, "rw": {false, unix.MS_RDONLY},
	"nosuid": {true, unix.MS_NOSUID}, "suid": {false, unix.MS_NOSUID},
	"nodev": {true, unix.MS_NODEV}, "dev": {false, unix.MS_NODEV},
	"noexec": {true, unix.MS_NOEXEC}, "exec": {false, unix.MS_NOEXEC},
	"sync": {true, unix.MS_SYNCHRONOUS}, "async": {false, unix.MS_SYNCHRONOUS},
	"noatime": {true, unix.MS_NOATIME}, "atime": {false, unix.MS_NOATIME},
	"nodiratime": {true, unix.MS_NODIRATIME}, "diratime": {false, unix.MS_NODIRATIME},
	"relatime": {true, unix.MS_RELATIME}, "norelatime": {false, unix.MS_RELATIME},
	"strictatime": {true, unix.MS_STRICTATIME},
	"bind":        {true, unix.MS_BIND}, "rbind": {true, unix.MS_BIND | unix.MS_REC},
}

// parseOptions splits mount options into flags and the comma-joined rest, which is the file system's data
// (overlay's lowerdir=..., upperdir=..., workdir=...).
func parseOptions(opts []string) (flags uintptr, data string) {
	var rest []string
	for _, o := range opts {
		if f, ok := mountFlags[o]; ok {
			if f.set {
				flags |= f.flag
			} else {
				flags &^= f.flag
			}
			continue
		}
		rest = append(rest, o)
	}
	return flags, strings.Join(rest, ",")
}

// isBind reports whether an OCI or containerd mount is a bind mount.
func isBind(typ string, opts []string) bool {
	return typ == "bind" || slices.Contains(opts, "bind") || slices.Contains(opts, "rbind")
}

// isRecursive reports whether bind options ask for the mounts below the source too ("rbind"; a plain "bind",
// or a "bind" type with neither option, binds the source's own mount alone, as runc does).
func isRecursive(opts []string) bool {
	return slices.Contains(opts, "rbind")
}

// isRecursiveReadonly reports whether options ask for every mount of a bind to be read-only ("rro").
func isRecursiveReadonly(opts []string) bool {
	return slices.Contains(opts, "rro")
}

// isReadonly reports whether options ask for a read-only mount; the last of "ro" and "rw" wins.
func isReadonly(opts []string) bool {
	ro := false
	for _, o := range opts {
		switch o {
		case "ro":
			ro = true
		case "rw":
			ro = false
		}
	}
	return ro
}
