package share

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/kiln-runtime/kiln/mounttree"
)

// maxSymlinks bounds the symlinks one walk follows, as the kernel's own limit does.
const maxSymlinks = 40

// addWritableLocked remembers dir, a real path, as exported read-write.
func (s *Share) addWritableLocked(dir string) {
	if !slices.Contains(s.writable, dir) {
		s.writable = append(s.writable, dir)
	}
}

// addWritableTreeLocked remembers what exporting dir (a real path) lets the guest write: dir itself when top,
// and, when below (a recursive export that is not read-only all the way down), each host mount under dir, which
// a plain "ro" leaves writable (submountBinds even hands them to the guest read-write).
func (s *Share) addWritableTreeLocked(dir string, top, below bool) {
	if top {
		s.addWritableLocked(dir)
	}
	if !below {
		return
	}
	mps, err := mounttree.Points(dir)
	if err != nil {
		// Bounding the whole source instead is the safe side.
		s.addWritableLocked(dir)
		return
	}
	for _, mp := range mps {
		if mp != dir {
			s.addWritableLocked(mp)
		}
	}
}

// boundLocked returns src with its root narrowed to the first directory exported read-write (s.writable) that
// resolving src reaches, and its path made relative to that directory: from there on the guest may have planted
// symlinks, so open resolves the rest beneath it and never follows them out. A source that reaches no such
// directory is returned unchanged.
//
// The comparison is between real paths, not the names callers used: src is walked one component at a time the
// way the kernel resolves it, following the host's own symlinks (those outside every writable directory), first
// src.Root from "/" without bound, then src.Path beneath src.Root. So a writable directory is caught however it
// is reached: through a host symlink to it or to one of its parents, through a host symlink pointing into it, or
// back up through "..". The walk stops before looking at anything inside a writable directory, and the host's
// own symlinks are not the guest's to change, so the open that follows resolves what the walk saw.
func (s *Share) boundLocked(src Source) (Source, error) {
	if len(s.writable) == 0 {
		return src, nil
	}
	root := src.Root
	if root == "" {
		root = "/"
	}
	if !filepath.IsAbs(root) || src.Path == "" {
		return src, nil // open refuses it
	}
	root = filepath.Clean(root)
	path := src.Path
	if filepath.IsAbs(path) {
		p := filepath.Clean(path)
		if !mounttree.Under(p, root) {
			return src, nil // open refuses it with ErrEscape
		}
		path = strings.TrimPrefix(p, root)
	}
	w := walker{writable: s.writable, cur: "/", floor: "/"}
	b, ok, err := w.walk(root)
	if err != nil {
		return Source{}, fmt.Errorf("resolve source root %s: %w", root, err)
	}
	if ok {
		b.Path = joinRel(b.Path, path)
		return b, nil
	}
	w.floor = w.cur
	b, ok, err = w.walk(path)
	if err != nil && root == "/" {
		return Source{}, fmt.Errorf("resolve %s: %w", src.Path, err)
	}
	if err != nil {
		return Source{}, fmt.Errorf("resolve %s beneath %s: %w", src.Path, root, err)
	}
	if ok {
		return b, nil
	}
	return src, nil
}

// walker resolves a path one component at a time, on the host's real directories.
type walker struct {
	writable []string
	// cur is the real directory reached so far; it lies in no writable directory.
	cur string
	// floor is what ".." cannot climb above; unless it is "/", an absolute symlink leaves it.
	floor string
	links int
}

// walk resolves path from w.cur. It stops at the first step into a writable directory and returns that
// directory as the root beneath which the remaining components are to be resolved.
func (w *walker) walk(path string) (Source, bool, error) {
	todo := strings.Split(path, "/")
	for {
		if d := w.writableAt(w.cur); d != "" {
			return Source{Root: d, Path: joinRel(strings.TrimPrefix(strings.TrimPrefix(w.cur, d), "/"), strings.Join(todo, "/"))}, true, nil
		}
		if len(todo) == 0 {
			return Source{}, false, nil
		}
		c := todo[0]
		todo = todo[1:]
		switch c {
		case "", ".":
			continue
		case "..":
			if w.cur == w.floor {
				if w.floor == "/" {
					continue
				}
				return Source{}, false, fmt.Errorf("'..' climbs above %s: %w", w.floor, ErrEscape)
			}
			w.cur = filepath.Dir(w.cur)
			continue
		}
		next := filepath.Join(w.cur, c)
		if d := w.writableAt(next); d != "" {
			// next is d itself: w.cur lies in no writable directory. Nothing in d is looked at here.
			w.cur = next
			continue
		}
		fi, err := os.Lstat(next)
		if err != nil {
			return Source{}, false, err
		}
		if fi.Mode()&os.ModeSymlink == 0 {
			w.cur = next
			continue
		}
		if w.links++; w.links > maxSymlinks {
			return Source{}, false, fmt.Errorf("more than %d symlinks, at %s: %w", maxSymlinks, next, unix.ELOOP)
		}
		target, err := os.Readlink(next)
		if err != nil {
			return Source{}, false, err
		}
		if filepath.IsAbs(target) {
			if w.floor != "/" {
				return Source{}, false, fmt.Errorf("symlink %s -> %s leaves %s: %w", next, target, w.floor, ErrEscape)
			}
			w.cur = "/"
		}
		todo = append(strings.Split(target, "/"), todo...)
	}
}

// writableAt returns the deepest writable directory that p lies in, or "".
func (w *walker) writableAt(p string) string {
	best := ""
	for _, d := range w.writable {
		if mounttree.Under(p, d) && len(d) > len(best) {
			best = d
		}
	}
	return best
}

// joinRel joins two relative slash-separated paths without cleaning them (".." is the kernel's to resolve),
// giving "." for an empty result.
func joinRel(a, b string) string {
	a, b = strings.Trim(a, "/"), strings.Trim(b, "/")
	switch {
	case a == "" && b == "":
		return "."
	case a == "":
		return b
	case b == "":
		return a
	}
	return a + "/" + b
}
