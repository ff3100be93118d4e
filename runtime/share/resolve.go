package share

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/kiln-runtime/kiln/mounttree"
)

// ErrEscape is returned for a source whose resolution leaves the root it must stay beneath.
var ErrEscape = errors.New("source escapes its root through a symlink or '..'")

// Source names a host file or directory to share: Path, resolved beneath Root.
//
// Path escapes Root when resolving it would leave Root at any step: a ".." that climbs above Root, a symlink with
// an absolute target (a host path, which is never read as relative to Root), a symlink whose relative target
// climbs above Root, or a /proc magic link. Such a source is rejected with ErrEscape; a symlink whose target
// stays beneath Root is followed. With Root "/" (or empty) nothing escapes and host symlinks such as
// /var/run -> /run are followed as usual.
//
// The file found is opened once and mounted through that descriptor, so a symlink swapped in after the check
// cannot redirect the mount.
type Source struct {
	// Root bounds the resolution; empty means "/".
	Root string
	// Path is relative to Root, or absolute and lexically at or below Root.
	Path string
}

// open resolves src and opens what it names with O_PATH. resolved is the path the kernel reports for the open
// file.
func (src Source) open() (f *os.File, resolved string, err error) {
	root := src.Root
	if root == "" {
		root = "/"
	}
	if !filepath.IsAbs(root) {
		return nil, "", fmt.Errorf("source root %q is not absolute", root)
	}
	root = filepath.Clean(root)
	p := src.Path
	if p == "" {
		return nil, "", errors.New("empty source path")
	}
	if filepath.IsAbs(p) {
		p = filepath.Clean(p)
		if !mounttree.Under(p, root) {
			return nil, "", fmt.Errorf("source %s is not under its root %s: %w", p, root, ErrEscape)
		}
		p = strings.TrimPrefix(strings.TrimPrefix(p, root), "/")
		if p == "" {
			p = "."
		}
	}
	var fd int
	if root == "/" {
		fd, err = unix.Open("/"+p, unix.O_PATH|unix.O_CLOEXEC, 0)
	} else {
		rootFD, oerr := unix.Open(root, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if oerr != nil {
			return nil, "", fmt.Errorf("open source root %s: %w", root, oerr)
		}
		defer unix.Close(rootFD)
		fd, err = unix.Openat2(rootFD, p, &unix.OpenHow{
			Flags:   unix.O_PATH | unix.O_CLOEXEC,
			Resolve: unix.RESOLVE_BENEATH | unix.RESOLVE_NO_MAGICLINKS,
		})
		if errors.Is(err, unix.EXDEV) {
			return nil, "", fmt.Errorf("resolve %s beneath %s: %w", src.Path, root, ErrEscape)
		}
		if errors.Is(err, unix.ELOOP) {
			return nil, "", fmt.Errorf("resolve %s beneath %s: symlink loop or /proc magic link: %w", src.Path, root, err)
		}
	}
	if err != nil {
		return nil, "", fmt.Errorf("open source %s (root %s): %w", src.Path, root, err)
	}
	f = os.NewFile(uintptr(fd), filepath.Join(root, p))
	resolved, err = os.Readlink(fmt.Sprintf("/proc/self/fd/%d", fd))
	if err != nil {
		f.Close()
		return nil, "", fmt.Errorf("resolve source %s: %w", src.Path, err)
	}
	return f, resolved, nil
}
