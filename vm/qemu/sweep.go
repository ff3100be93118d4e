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
		if err := os.RemoveAll(dir); err != nil {
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
