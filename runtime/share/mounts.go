package share

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/containerd/containerd/v2/core/mount"
	"golang.org/x/sys/unix"

	"github.com/kiln-runtime/kiln/mounttree"
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
		if err := s.mountOneLocked(m, target, readonly); err != nil {
			_ = mounttree.UnmountUnder(target)
			_ = os.Remove(target)
			s.forgetEmptyLocked(containerID)
			return "", fmt.Errorf("add rootfs of container %s to share: mount %d (%s %s): %w", containerID, i, m.Type, m.Source, err)
		}
	}
	c.rootfs = true
	return containerID + "/rootfs", nil
}

// mountOne mounts m at target. Options "uidmap=" and "gidmap=" (containerd's snapshotters add them to the root
// of a container with a user namespace, in the snapshot's labels' form "<container id>:<host id>:<size>") ask
// for an idmapped mount: files owned by host id N show as owned by N's mapped id, so that the container's
// mapped root owns the image's root-owned files. The guest's virtio-fs cannot idmap (Linux 6.1), so it is done
// here, on the host, and the guest sees the mapped owners through virtiofsd.
//
// What the guest can write through the mount (a read-write bind's source, an overlay's upper directory) is
// remembered as exported read-write, and a bind's source is resolved as AddBindSource's are (boundLocked).
func (s *Share) mountOneLocked(m Mount, target string, readonly bool) error {
	uidmap, gidmap, opts := idmapOptions(m.Options)
	if (uidmap == "") != (gidmap == "") {
		return fmt.Errorf("an idmapped mount needs both uidmap= and gidmap= options, got uidmap=%q gidmap=%q", uidmap, gidmap)
	}
	flags := mountFlagsOf(opts)
	if readonly {
		flags |= unix.MS_RDONLY
	}
	if m.Type == "bind" || flags&unix.MS_BIND != 0 {
		bounded, err := s.boundLocked(Source{Path: m.Source})
		if err != nil {
			return err
		}
		src, resolved, err := bounded.open()
		if err != nil {
			return err
		}
		defer src.Close()
		bo := BindOptions{
			RecursiveReadonly: flags&unix.MS_RDONLY != 0, Recursive: flags&unix.MS_REC != 0, UIDMap: uidmap, GIDMap: gidmap,
		}
		if err := bindFrom(src, target, bo); err != nil {
			return err
		}
		if fi, err := src.Stat(); err == nil && fi.IsDir() {
			s.addWritableTreeLocked(resolved, !bo.RecursiveReadonly, false)
		}
		return nil
	}
	if m.Type == "overlay" && flags&unix.MS_RDONLY == 0 {
		for _, o := range opts {
			if upper, ok := strings.CutPrefix(o, "upperdir="); ok {
				if real, err := filepath.EvalSymlinks(upper); err == nil {
					s.addWritableLocked(real)
				}
			}
		}
	}
	// containerd's mount package mounts as it does for runc: an overlay idmapped through its lower directories
	// (each gets an idmapped mount; the snapshotter gave the upper one to the mapped root), and an overlay of
	// more layers than mount(2)'s one page of options holds (the kernel cuts them there, which fails the mount or
	// mounts another directory as the bottom layer) with its lower directories named from a common parent.
	cm := mount.Mount{Type: m.Type, Source: m.Source, Options: slices.Clone(m.Options)}
	if readonly {
		cm.Options = append(cm.Options, "ro")
	}
	if err := cm.Mount(target); err != nil {
		return fmt.Errorf("mount %s: %w", m.Type, err)
	}
	return nil
}

// idmapOptions takes the "uidmap=" and "gidmap=" options out of opts.
func idmapOptions(opts []string) (uidmap, gidmap string, rest []string) {
	for _, o := range opts {
		if v, ok := strings.CutPrefix(o, "uidmap="); ok {
			uidmap = v
		} else if v, ok := strings.CutPrefix(o, "gidmap="); ok {
			gidmap = v
		} else {
			rest = append(rest, o)
		}
	}
	return uidmap, gidmap, rest
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

// mountFlagsOf is the mount flags opts set, in order (a later "rw" clears an earlier "ro"); the file system's
// own options (overlay's lowerdir=...) set none.
func mountFlagsOf(opts []string) (flags uintptr) {
	for _, o := range opts {
		if f, ok := mountFlags[o]; ok {
			if f.set {
				flags |= f.flag
			} else {
				flags &^= f.flag
			}
		}
	}
	return flags
}

// IsBind reports whether an OCI or containerd mount is a bind mount.
func IsBind(typ string, opts []string) bool {
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
