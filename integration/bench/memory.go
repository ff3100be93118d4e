package main

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kiln-runtime/kiln/integration/cri"
)

// idleSettle is how long idle pods sit before their memory is read: a guest's boot-time allocations have
// settled by then.
const idleSettle = 10 * time.Second

// memoryParts is memory per pod, in bytes, by where it is: a kind of process (processKind), guest RAM memfds or
// template files.
type memoryParts map[string]int64

// total is the sum of the parts.
func (m memoryParts) total() int64 {
	var t int64
	for _, v := range m {
		t += v
	}
	return t
}

// String lists the parts in MB, largest first.
func (m memoryParts) String() string {
	keys := slices.Collect(maps.Keys(m))
	slices.SortFunc(keys, func(a, b string) int { return cmp.Compare(m[b], m[a]) })
	parts := make([]string, 0, len(keys))
	for _, k := range keys {
		parts = append(parts, fmt.Sprintf("%s %.1f", k, float64(m[k])/1e6))
	}
	return strings.Join(parts, ", ")
}

// processKind names what a process of a pod is, by its command name: a shim, QEMU, virtiofsd, or other (a
// runc container's processes).
func processKind(pid int) string {
	comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
	switch c := strings.TrimSpace(string(comm)); {
	case strings.HasPrefix(c, "containerd-shim"):
		return "shims"
	case strings.HasPrefix(c, "qemu"):
		return "QEMU"
	case strings.HasPrefix(c, "virtiofsd"):
		return "virtiofsd"
	default:
		return "other processes"
	}
}

// podMemory starts n idle pods with the handler and returns, by part, what they add per pod: the PSS of every
// process they add (the shims and all below them: runc's containers, or Kiln's QEMU and virtiofsd), the files
// under templates (VM templates, on tmpfs: memory whether mapped or not) and the guest RAM memfds (a clone's copy
// of its template), each counted once, divided by n. PSS shares pages mapped by several processes among them
// (guest RAM is mapped by QEMU, virtiofsd and the shim's vsock device), so the sum counts each page once;
// mappings of the files under templates and of memfds (guest RAM) are left out of it, since those are counted
// whole. settled, when set, is waited for after the pods have settled (a spare pool filled again).
func podMemory(ctx context.Context, e *cri.Env, handler string, n int, templates string, settled func() error) (memoryParts, error) {
	var ids []string
	defer func() {
		for _, id := range ids {
			_ = e.RemovePod(context.WithoutCancel(ctx), id)
		}
	}()
	for i := range n {
		_, id, err := startPod(ctx, e, handler, fmt.Sprintf("idle-%s-%d", handler, i), 0, "sleep", "3600")
		if err != nil {
			return nil, err
		}
		ids = append(ids, id)
	}
	time.Sleep(idleSettle)
	if settled != nil {
		if err := settled(); err != nil {
			return nil, err
		}
	}
	shim := "containerd-shim-" + map[string]string{cri.HandlerRunc: "runc", cri.HandlerKiln: "kiln"}[handler] + "-v2"
	pids, err := subtreesOf(func(pid int, cmdline string) bool {
		return strings.Contains(cmdline, shim) && strings.Contains(cmdline, e.Daemon.Address)
	})
	if err != nil {
		return nil, err
	}
	parts := memoryParts{}
	for _, pid := range pids {
		pss, err := pssOf(pid, templates)
		if err != nil {
			continue // gone meanwhile
		}
		parts[processKind(pid)] += pss
	}
	// Guest RAM in memfds (a cold VM's QEMU-made one, a clone's copy of its template) holds pages no process has
	// mapped yet, which PSS leaves out: each memfd counts whole, once.
	mem, err := memfdBytes(pids)
	if err != nil {
		return nil, err
	}
	parts["guest RAM (memfds)"] += mem
	if handler == cri.HandlerKiln {
		files, err := allocated(templates)
		if err != nil {
			return nil, err
		}
		parts["templates"] += files
	}
	for k := range parts {
		parts[k] /= int64(n)
	}
	return parts, nil
}

// memfdBytes is the space the memfds the processes hold open take (st_blocks), each counted once.
func memfdBytes(pids []int) (int64, error) {
	seen := map[[2]uint64]bool{}
	var total int64
	for _, pid := range pids {
		dir := fmt.Sprintf("/proc/%d/fd", pid)
		fds, err := os.ReadDir(dir)
		if err != nil {
			continue // gone meanwhile
		}
		for _, fd := range fds {
			p := filepath.Join(dir, fd.Name())
			if target, err := os.Readlink(p); err != nil || !strings.HasPrefix(target, "/memfd:") {
				continue
			}
			var st unix.Stat_t
			if err := unix.Stat(p, &st); err != nil {
				continue
			}
			if k := [2]uint64{st.Dev, st.Ino}; !seen[k] {
				seen[k] = true
				total += st.Blocks * 512
			}
		}
	}
	return total, nil
}

// allocated is the space the files under dir take (st_blocks), 0 when there is no dir.
func allocated(dir string) (int64, error) {
	var total int64
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		if err != nil || !d.Type().IsRegular() {
			return err
		}
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			return nil // gone meanwhile
		}
		total += st.Blocks * 512
		return nil
	})
	return total, err
}

// subtreesOf lists the processes that match and all their descendants.
func subtreesOf(match func(pid int, cmdline string) bool) ([]int, error) {
	stats, err := readProcStats()
	if err != nil {
		return nil, err
	}
	children := map[int][]int{}
	var roots []int
	for pid, st := range stats {
		if len(st.fields) < 2 {
			continue
		}
		ppid, _ := strconv.Atoi(st.fields[1])
		children[ppid] = append(children[ppid], pid)
		cmd, _ := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "cmdline"))
		if match(pid, string(bytes.ReplaceAll(cmd, []byte{0}, []byte{' '}))) {
			roots = append(roots, pid)
		}
	}
	var out []int
	seen := map[int]bool{}
	for len(roots) > 0 {
		pid := roots[0]
		roots = roots[1:]
		if seen[pid] {
			continue
		}
		seen[pid] = true
		out = append(out, pid)
		roots = append(roots, children[pid]...)
	}
	return out, nil
}

// pssOf reads a process's proportional set size in bytes, leaving out mappings of files under exclude and of
// memfds (podMemory counts both whole).
func pssOf(pid int, exclude string) (int64, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/smaps", pid))
	if err != nil {
		return 0, err
	}
	defer f.Close()
	var total int64
	skip := false
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		fields := strings.Fields(line)
		// A mapping's header: "start-end perms offset dev inode [path]"; its fields follow as "Name: value".
		if len(fields) >= 5 && strings.Contains(fields[0], "-") && !strings.HasSuffix(fields[0], ":") {
			skip = len(fields) >= 6 && (strings.HasPrefix(fields[5], "/memfd:") ||
				exclude != "" && strings.HasPrefix(fields[5], exclude+"/"))
			continue
		}
		if v, ok := strings.CutPrefix(line, "Pss:"); ok && !skip {
			kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			if err != nil {
				return 0, fmt.Errorf("smaps of %d: %q: %w", pid, line, err)
			}
			total += kb << 10
		}
	}
	return total, sc.Err()
}
