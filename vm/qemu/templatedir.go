package qemu

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// trustedDir says why dir cannot be trusted to hold templates, nil when it can: every clone runs the kernel, the
// agent and the memory a template holds, so nobody but root (or Kiln's own user) may be able to put anything
// there. Each existing part of dir, as written and as its links resolve, must belong to root or Kiln's user and be
// writable by no one else; a directory above dir may be writable by all if it is sticky (as /dev/shm and /tmp
// are: there others cannot rename or remove what is not theirs), dir itself may not (others could add a
// template). A part not made yet is judged once made: whoever makes it first owns it, so a caller checks again
// after it has made dir.
func trustedDir(dir string) error {
	dir = filepath.Clean(dir)
	if err := trustedChain(dir, dir); err != nil {
		return err
	}
	existing := dir
	for {
		if _, err := os.Lstat(existing); err == nil || existing == filepath.Dir(existing) {
			break
		}
		existing = filepath.Dir(existing)
	}
	resolved, err := filepath.EvalSymlinks(existing)
	if err != nil {
		return err
	}
	if resolved != existing {
		leaf := ""
		if existing == dir {
			leaf = resolved
		}
		return trustedChain(resolved, leaf)
	}
	return nil
}

// trustedChain checks path and each directory above it, as written (a link itself, not where it leads); leaf, if
// among them, is the template directory, which no sticky bit excuses.
func trustedChain(path, leaf string) error {
	euid := uint32(os.Geteuid())
	for p := path; ; p = filepath.Dir(p) {
		var st unix.Stat_t
		err := unix.Lstat(p, &st)
		switch {
		case errors.Is(err, unix.ENOENT):
		case err != nil:
			return &os.PathError{Op: "lstat", Path: p, Err: err}
		case st.Uid != 0 && st.Uid != euid:
			return fmt.Errorf("%s belongs to uid %d, who could replace the templates every VM runs: remove it (Kiln makes it) or choose another hypervisor.template_dir", p, st.Uid)
		case st.Mode&unix.S_IFMT != unix.S_IFLNK && st.Mode&0o022 != 0 && (st.Mode&unix.S_ISVTX == 0 || p == leaf):
			return fmt.Errorf("%s is writable by others (mode %#o), who could put or replace templates every VM runs: make it writable by root alone or choose another hypervisor.template_dir", p, st.Mode&0o7777)
		}
		if p == filepath.Dir(p) {
			return nil
		}
	}
}
