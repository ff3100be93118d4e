package share

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/containerd/errdefs"

	"github.com/kiln-runtime/kiln/mounttree"
)

// AddRootfs binds hostRootfs, a directory, at the container's root in the share and returns its path relative to
// the share, "<id>/rootfs". A writable root is bound with the mounts below it. A read-only one is bound alone,
// read-only: the guest layers it (an overlay, which cannot reach virtio-fs submounts below it), so the mounts
// below it are the caller's to share as binds of their own (MountsBelow), as runc's recursive bind would show
// them. hostRootfs comes from the caller (a bundle or a snapshot) and is resolved without bound, except beneath a
// directory the share exported read-write (see AddBindSource).
func (s *Share) AddRootfs(ctx context.Context, containerID, hostRootfs string, readonly bool) (guestRel string, err error) {
	if !filepath.IsAbs(hostRootfs) {
		return "", fmt.Errorf("add rootfs of container %s to share: path %q is not absolute", containerID, hostRootfs)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return "", fmt.Errorf("add rootfs of container %s to share: share is closed", containerID)
	}
	bounded, err := s.boundLocked(Source{Path: hostRootfs})
	if err != nil {
		return "", fmt.Errorf("add rootfs of container %s to share: %w", containerID, err)
	}
	src, resolved, err := bounded.open()
	if err != nil {
		return "", fmt.Errorf("add rootfs of container %s to share: %w", containerID, err)
	}
	defer src.Close()
	fi, err := src.Stat()
	if err != nil {
		return "", fmt.Errorf("add rootfs of container %s to share: %w", containerID, err)
	}
	if !fi.IsDir() {
		return "", fmt.Errorf("add rootfs of container %s to share: %s is not a directory", containerID, hostRootfs)
	}
	c, target, err := s.prepareRootfsLocked(containerID, resolved)
	if err != nil {
		return "", fmt.Errorf("add rootfs of container %s to share: %w", containerID, err)
	}
	if err := bindFrom(src, target, BindOptions{Readonly: readonly, Recursive: !readonly}); err != nil {
		_ = os.Remove(target)
		s.forgetEmptyLocked(containerID)
		return "", fmt.Errorf("add rootfs of container %s to share: %w", containerID, err)
	}
	c.rootfs = true
	if !readonly {
		s.addWritableLocked(resolved)
	}
	return containerID + "/rootfs", nil
}

// MountsBelow resolves dir, a host directory, and lists the mount points its tree shows below it (mounttree.Visible)
// that lie below no other of them, in the order they were mounted: binding each recursively shows what a recursive
// bind of dir would.
func MountsBelow(dir string) (real string, below []string, err error) {
	real, err = filepath.EvalSymlinks(dir)
	if err != nil {
		return "", nil, fmt.Errorf("mounts below %s: %w", dir, err)
	}
	points, err := mounttree.Visible(real)
	if err != nil {
		return "", nil, fmt.Errorf("mounts below %s: %w", dir, err)
	}
	for _, p := range points {
		if !slices.ContainsFunc(below, func(b string) bool { return mounttree.Under(p, b) }) {
			below = append(below, p)
		}
	}
	return real, below, nil
}

// prepareRootfsLocked checks that the container has no root yet and creates its mount point. On error, and when
// the caller's mount fails after it, a record it created is forgotten again (forgetEmptyLocked).
func (s *Share) prepareRootfsLocked(containerID, resolvedSource string) (*container, string, error) {
	c, err := s.containerLocked(containerID)
	if err != nil {
		return nil, "", err
	}
	if c.rootfs {
		return nil, "", errors.New("container already has a root file system in the share")
	}
	if resolvedSource != "" && mounttree.Under(resolvedSource, s.dir) {
		s.forgetEmptyLocked(containerID)
		return nil, "", fmt.Errorf("source %s lies inside the share", resolvedSource)
	}
	target := filepath.Join(s.mounts, containerID, "rootfs")
	if err := os.Mkdir(target, 0o755); err != nil {
		s.forgetEmptyLocked(containerID)
		return nil, "", fmt.Errorf("create rootfs mount point: %w", err)
	}
	return c, target, nil
}

// forgetEmptyLocked undoes containerLocked for a container whose root did not go in and that uses no bind source:
// its record, and its directory, which the guest sees under shared/, stayed until the share's end, one for each
// failed create (kubelet retries with new ids), since the pod removes from the share only what went in.
func (s *Share) forgetEmptyLocked(id string) {
	c := s.containers[id]
	if c == nil || c.rootfs {
		return
	}
	for _, b := range s.binds {
		if b.users[id] {
			return
		}
	}
	delete(s.containers, id)
	_ = os.Remove(filepath.Join(s.mounts, id))
}

// BindOptions say how a bind source is shared.
type BindOptions struct {
	// Readonly exports the source's own mount read-only; mounts below it keep their flags (OCI "ro").
	Readonly bool
	// RecursiveReadonly exports the source read-only with every mount below it (OCI "rro").
	RecursiveReadonly bool
	// Recursive exports the mounts below the source as well (an OCI "rbind"). Without it only the source's own
	// mount is exported (an OCI "bind"): where another file system is mounted below the source, the guest sees
	// the directory it is mounted on.
	Recursive bool
	// UIDMap and GIDMap idmap the export, both or neither, in containerd's "<container id>:<host id>:<size>"
	// form, comma-separated (an OCI mount's uidMappings and gidMappings): a file owned by id N on the host shows
	// as the id N maps to, as runc's idmapped bind mounts do. The guest's virtio-fs cannot idmap (Linux 6.1), so
	// the guest sees the mapped owners through virtiofsd. Only the source's own mount is idmapped unless
	// RecursiveIDMap (OCI "ridmap") asks for the mounts below it too.
	UIDMap, GIDMap string
	RecursiveIDMap bool
}

// AddBind shares source, an absolute host path to a file or directory, with the mounts below it (an rbind), and
// returns where the guest finds it. See AddBindSource for how the source is resolved.
func (s *Share) AddBind(ctx context.Context, containerID, source string, readonly bool) (guestPath string, err error) {
	if !filepath.IsAbs(source) {
		return "", fmt.Errorf("add bind %s of container %s to share: not an absolute path", source, containerID)
	}
	return s.AddBindSource(ctx, containerID, Source{Path: source}, BindOptions{Readonly: readonly, Recursive: true})
}

// AddBindSource shares src for a container and returns where the guest finds it, under GuestDir. src is
// resolved as Source describes, with one more bound: once its resolution reaches a directory this share exported
// read-write (a container's rootfs or writable bind, for as long as the share lives), the rest is resolved
// beneath that directory, whatever src.Root says, because the guest may have planted symlinks there; see
// boundLocked. A source resolving into the share itself is rejected.
func (s *Share) AddBindSource(ctx context.Context, containerID string, src Source, opts BindOptions) (guestPath string, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return "", fmt.Errorf("add bind %s of container %s to share: share is closed", src.Path, containerID)
	}
	bounded, err := s.boundLocked(src)
	if err != nil {
		return "", fmt.Errorf("add bind %s of container %s to share: %w", src.Path, containerID, err)
	}
	f, resolved, err := bounded.open()
	if err != nil {
		return "", fmt.Errorf("add bind %s of container %s to share: %w", src.Path, containerID, err)
	}
	defer f.Close()
	if mounttree.Under(resolved, s.dir) {
		return "", fmt.Errorf("add bind %s of container %s to share: source %s lies inside the share", src.Path, containerID, resolved)
	}
	fi, err := f.Stat()
	if err != nil {
		return "", fmt.Errorf("add bind %s of container %s to share: %w", src.Path, containerID, err)
	}
	if kind := connectionKind(fi.Mode()); kind != "" {
		return "", fmt.Errorf("%w: add bind %s of container %s to share: %s is a %s: virtio-fs carries files, not connections, "+
			"so a process in the VM would see it but never reach what is at its other end on the host; "+
			"reach that service over the pod's network instead", errdefs.ErrInvalidArgument, src.Path, containerID, resolved, kind)
	}
	if _, err := s.containerLocked(containerID); err != nil {
		return "", fmt.Errorf("add bind %s of container %s to share: %w", src.Path, containerID, err)
	}
	key, err := bindKeyOf(f, fi, opts)
	if err != nil {
		return "", fmt.Errorf("add bind %s of container %s to share: %w", src.Path, containerID, err)
	}
	if b := s.reusableBindLocked(key); b != nil {
		b.users[containerID] = true
		return GuestPath(b.rel), nil
	}
	// Each export has a directory of its own, which its removal takes away whole.
	s.nextBind++
	rel := podBinds + "/" + strconv.Itoa(s.nextBind)
	for _, d := range []string{filepath.Join(s.mounts, podBinds), filepath.Join(s.mounts, rel)} {
		if err := os.Mkdir(d, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
			return "", fmt.Errorf("add bind %s of container %s to share: %w", src.Path, containerID, err)
		}
	}
	rel += "/" + safeName(filepath.Base(resolved))
	target := filepath.Join(s.mounts, rel)
	// A bind needs a mount point of the same kind as its source.
	if fi.IsDir() {
		err = os.Mkdir(target, 0o755)
	} else {
		var t *os.File
		if t, err = os.OpenFile(target, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o644); err == nil {
			err = t.Close()
		}
	}
	if err != nil {
		_ = os.Remove(filepath.Dir(target))
		return "", fmt.Errorf("add bind %s of container %s to share: create mount point: %w", src.Path, containerID, err)
	}
	if err := bindFrom(f, target, opts); err != nil {
		_ = os.Remove(target)
		_ = os.Remove(filepath.Dir(target))
		return "", fmt.Errorf("add bind %s of container %s to share: %w", src.Path, containerID, err)
	}
	if fi.IsDir() {
		s.addWritableTreeLocked(resolved, !opts.Readonly, opts.Recursive && !opts.RecursiveReadonly)
	}
	b := &podBind{rel: rel, users: map[string]bool{containerID: true}}
	s.binds[key] = b
	return GuestPath(b.rel), nil
}

// connectionKind names a source that is a rendezvous with a host process rather than a file (a socket, a named
// pipe), or is "".
func connectionKind(m os.FileMode) string {
	switch {
	case m&os.ModeSocket != 0:
		return "Unix socket"
	case m&os.ModeNamedPipe != 0:
		return "named pipe"
	}
	return ""
}

// safeName keeps a bind's base name readable in the guest without letting it carry odd characters.
func safeName(base string) string {
	b := []byte(base)
	for i, ch := range b {
		if !(ch >= 'a' && ch <= 'z' || ch >= 'A' && ch <= 'Z' || ch >= '0' && ch <= '9' || strings.IndexByte("._-", ch) >= 0) {
			b[i] = '_'
		}
	}
	if len(b) > 64 {
		b = b[:64]
	}
	if len(b) == 0 || string(b) == "." || string(b) == ".." {
		return "root"
	}
	return string(b)
}
