package main

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/kiln-runtime/kiln/integration/cri"
)

// idleSettle is how long idle pods sit before their memory is read: a guest's boot-time allocations have
// settled by then.
const idleSettle = 10 * time.Second

// podMemory starts n idle pods with the handler and returns the PSS, in bytes, of every process they add (the
// shims and all below them: runc's containers, or Kiln's QEMU and virtiofsd), divided by n. PSS shares pages
// mapped by several processes among them (guest RAM is mapped by QEMU, virtiofsd and the shim's vsock device),
// so the sum counts each page once.
func podMemory(ctx context.Context, e *cri.Env, handler string, n int) (int64, error) {
	var ids []string
	defer func() {
		for _, id := range ids {
			_ = e.RemovePod(context.WithoutCancel(ctx), id)
		}
	}()
	for i := range n {
		_, id, err := startPod(ctx, e, handler, fmt.Sprintf("idle-%s-%d", handler, i), "sleep", "3600")
		if err != nil {
			return 0, err
		}
		ids = append(ids, id)
	}
	time.Sleep(idleSettle)
	shim := "containerd-shim-" + map[string]string{cri.HandlerRunc: "runc", cri.HandlerKiln: "kiln"}[handler] + "-v2"
	pids, err := subtreesOf(func(pid int, cmdline string) bool {
		return strings.Contains(cmdline, shim) && strings.Contains(cmdline, e.Daemon.Address)
	})
	if err != nil {
		return 0, err
	}
	var total int64
	for _, pid := range pids {
		pss, err := pssOf(pid)
		if err != nil {
			continue // gone meanwhile
		}
		total += pss
	}
	return total / int64(n), nil
}

// subtreesOf lists the processes that match and all their descendants.
func subtreesOf(match func(pid int, cmdline string) bool) ([]int, error) {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return nil, err
	}
	children := map[int][]int{}
	var roots []int
	for _, ent := range entries {
		pid, err := strconv.Atoi(ent.Name())
		if err != nil {
			continue
		}
		stat, err := os.ReadFile(filepath.Join("/proc", ent.Name(), "stat"))
		if err != nil {
			continue
		}
		// The command name may hold spaces and parentheses: the fields after it start after the last ')'.
		rest := stat[bytes.LastIndexByte(stat, ')')+1:]
		f := strings.Fields(string(rest))
		if len(f) < 2 {
			continue
		}
		ppid, _ := strconv.Atoi(f[1])
		children[ppid] = append(children[ppid], pid)
		cmd, _ := os.ReadFile(filepath.Join("/proc", ent.Name(), "cmdline"))
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

// pssOf reads a process's proportional set size in bytes.
func pssOf(pid int) (int64, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "Pss:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			return kb << 10, err
		}
	}
	return 0, fmt.Errorf("no Pss in smaps_rollup of %d", pid)
}
