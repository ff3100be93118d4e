package qemu

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/kiln-runtime/kiln/mounttree"
	"github.com/kiln-runtime/kiln/vm/child"
)

// Sweep removes the state directories under root whose owning process no longer exists: what is left when a
// Kiln process was killed before it could clean up (its QEMU died with it through the parent-death signal).
// It returns the directories removed.
func Sweep(root string) ([]string, error) {
	entries, err := os.ReadDir(root)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var removed []string
	var errs []error
	for _, e := range entries {
		if !e.IsDir() {
			continue
		}
		dir := filepath.Join(root, e.Name())
		pid, err := ReadOwner(filepath.Join(dir, "owner"))
		if err != nil || OwnerAlive(pid) {
			// A directory without an owner file is not one of ours, or is being created right now.
			continue
		}
		if err := RemoveState(dir); err != nil {
			errs = append(errs, err)
			continue
		}
		removed = append(removed, dir)
	}
	return removed, errors.Join(errs...)
}

// ReadOwner reads a file holding the pid of the process that owns some host state.
func ReadOwner(path string) (int, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 0 {
		return 0, fmt.Errorf("owner file %s: %q is not a pid", path, b)
	}
	return pid, nil
}

// OwnerAlive reports whether pid is a process that has not exited. A zombie has exited: only its parent has not
// reaped it yet, which never happens where PID 1 does not reap orphans.
func OwnerAlive(pid int) bool {
	if errors.Is(unix.Kill(pid, 0), unix.ESRCH) {
		return false
	}
	b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "stat"))
	if err != nil {
		return false
	}
	i := bytes.LastIndexByte(b, ')')
	return !(i > 0 && i+2 < len(b) && b[i+2] == 'Z')
}

// cgroupsFile, in a VM's state directory, lists the VM's cgroup directories, one a line.
const cgroupsFile = "cgroups"

// RemoveState removes what a VM whose owner is gone left: its cgroup (listed in its state directory; QEMU and
// virtiofsd must be dead) and the state directory itself, whose mounts are taken away first. Only empty cgroup directories named after the VM
// (kiln-vm-<id>, <id> the state directory's name) under /sys/fs/cgroup are removed, whatever the file says.
func RemoveState(dir string) error {
	var errs []error
	if b, err := os.ReadFile(filepath.Join(dir, cgroupsFile)); err == nil {
		want := "kiln-vm-" + filepath.Base(dir)
		var dirs []string
		for _, l := range strings.Split(strings.TrimSpace(string(b)), "\n") {
			if l == filepath.Clean(l) && strings.HasPrefix(l, "/sys/fs/cgroup/") && filepath.Base(l) == want {
				dirs = append(dirs, l)
			} else if l != "" {
				errs = append(errs, fmt.Errorf("VM state %s names cgroup %q, not one of its own: left alone", dir, l))
			}
		}
		if err := child.RemoveDirs(dirs); err != nil {
			errs = append(errs, err)
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, fmt.Errorf("read VM cgroups: %w", err))
	}
	// A share left by a killed Kiln process may still have its bind mounts of host directories (volumes, root
	// file systems): take them away first, and never delete through one that stays.
	if err := mounttree.UnmountUnder(dir); err != nil {
		errs = append(errs, err)
	} else if err := mounttree.RemoveTree(dir); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}
