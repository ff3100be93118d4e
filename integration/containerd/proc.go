package containerd

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"

	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"
)

// processesWithArg lists the pids of processes one of whose command-line arguments equals arg.
func processesWithArg(arg string) []int {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	var pids []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil {
			continue
		}
		for _, a := range bytes.Split(b, []byte{0}) {
			if string(a) == arg {
				pids = append(pids, pid)
				break
			}
		}
	}
	return pids
}

// ProcessesMatching lists pids whose command line contains substr, for leftover checks.
func ProcessesMatching(substr string) []int {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	var pids []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil {
			continue
		}
		if strings.Contains(string(bytes.ReplaceAll(b, []byte{0}, []byte{' '})), substr) {
			pids = append(pids, pid)
		}
	}
	return pids
}

// statFields are the fields of /proc/<pid>/stat after the command name (which is in parentheses and may hold
// spaces): the state first, then the parent's pid; nil when the process is gone.
func statFields(pid int) []string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return nil
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return nil
	}
	return strings.Fields(string(b[i+1:]))
}

// stopped lists those of pids that are stopped (state T: SIGSTOP, a spare's hold).
func stopped(pids []int) []int {
	var out []int
	for _, pid := range pids {
		if f := statFields(pid); len(f) > 0 && f[0] == "T" {
			out = append(out, pid)
		}
	}
	return out
}

// MountsUnder lists the mount points at or below dir, deepest first.
func MountsUnder(dir string) ([]string, error) {
	mounts, err := mountinfo.GetMounts(mountinfo.PrefixFilter(filepath.Clean(dir)))
	if err != nil {
		return nil, fmt.Errorf("read mount table: %w", err)
	}
	points := make([]string, 0, len(mounts))
	for _, m := range mounts {
		points = append(points, m.Mountpoint)
	}
	sort.SliceStable(points, func(i, j int) bool { return len(points[i]) > len(points[j]) })
	return points, nil
}

// unmountUnder lazily unmounts everything mounted at or below dir.
func unmountUnder(dir string) error {
	points, err := MountsUnder(dir)
	if err != nil {
		return err
	}
	var errs []error
	for _, p := range points {
		if err := unix.Unmount(p, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("unmount %s: %w", p, err))
		}
	}
	return errors.Join(errs...)
}

// describe names each of pids for a leftover check's message: its state, its parent, how long it has run and its
// command line, so that a failure says what was left and who started it without a rerun.
func describe(pids []int) string {
	var b strings.Builder
	for _, pid := range pids {
		f := statFields(pid)
		cmd, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		line := strings.TrimSpace(string(bytes.ReplaceAll(cmd, []byte{0}, []byte{' '})))
		if len(f) < 20 {
			fmt.Fprintf(&b, "\n  %d (gone): %s", pid, line)
			continue
		}
		fmt.Fprintf(&b, "\n  %d (state %s, parent %s, started %s ticks after boot): %s", pid, f[0], f[1], f[19], line)
	}
	return b.String()
}
