package cri

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/moby/sys/mountinfo"

	"github.com/kiln-runtime/kiln/config"
	"github.com/kiln-runtime/kiln/integration/containerd"
	"github.com/kiln-runtime/kiln/runtime/spare"
)

// HostState is what a pod may leave on the host, as sorted lists of names: network namespaces (CRI's private
// netns directory, where the harness's containerd keeps every pod's), the ports of the harness's bridge and their
// qdiscs, mount points (those under the harness's directories and the host's Kiln directory), Kiln state
// directories (the harness's and /run/kiln) and CNI's cached results. The harness's own bridge, which CNI's DEL
// leaves by design, is not listed. The host's /run/netns is not: CRI never uses it, and tests of other packages
// running at the same time add and remove their namespaces there.
type HostState struct {
	Netns      []string
	Links      []string
	Qdiscs     []string
	Mounts     []string
	KilnState  []string
	CNIResults []string
}

// Snapshot reads the host state now, having stopped the harness containerd's spare shim: the spare a pod's shim
// started is not that pod's leftover, and with it stopped a pod's state is all that is listed.
func (e *Env) Snapshot() (HostState, error) {
	var s HostState
	var err error
	if e.Daemon != nil {
		if err := containerd.StopSpare(e.Daemon.Address, time.Minute); err != nil {
			return s, err
		}
	}
	ignore := ""
	if e.Net != nil {
		ignore = e.Net.Bridge
	}
	for _, n := range dirNames(e.NetnsDir()) {
		s.Netns = append(s.Netns, filepath.Join(e.NetnsDir(), n))
	}
	// Links and qdiscs: the ports of the harness's bridge (a pod's host-side veth stays there if CNI's DEL
	// did not run) and their qdiscs. The rest of the host's links belong to other users of the host (tests of
	// other packages running at the same time come and go) and are not compared.
	if _, err := net.InterfaceByName(ignore); ignore != "" && err == nil {
		links, err := lines("ip", "-o", "link", "show", "master", ignore)
		if err != nil {
			return s, err
		}
		for _, l := range links {
			// "3: name@peer: <...> ...": keep the name.
			f := strings.Fields(l)
			if len(f) < 2 {
				continue
			}
			name := strings.TrimSuffix(f[1], ":")
			if i := strings.Index(name, "@"); i >= 0 {
				name = name[:i]
			}
			s.Links = append(s.Links, name)
			qdiscs, err := lines("tc", "qdisc", "show", "dev", name)
			if err != nil {
				continue // gone in between
			}
			s.Qdiscs = append(s.Qdiscs, qdiscs...)
		}
	}
	mounts, err := mountinfo.GetMounts(nil)
	if err != nil {
		return s, fmt.Errorf("read mount table: %w", err)
	}
	for _, m := range mounts {
		if e.ownsPath(m.Mountpoint) {
			s.Mounts = append(s.Mounts, m.Mountpoint)
		}
	}
	for _, d := range []string{e.KilnStateDir(), config.Default().Runtime.StateDir} {
		for _, n := range dirNames(d) {
			// The spare shims' slots, one directory for every containerd on the host.
			if p := filepath.Join(d, n); p != spare.Dir {
				s.KilnState = append(s.KilnState, p)
			}
		}
	}
	for _, n := range dirNames("/var/lib/cni/results") {
		s.CNIResults = append(s.CNIResults, n)
	}
	for _, l := range [][]string{s.Netns, s.Links, s.Qdiscs, s.Mounts, s.KilnState, s.CNIResults} {
		sort.Strings(l)
	}
	return s, nil
}

// ownsPath tells whether a mount point is one a pod of this harness could leave: under the harness's or its
// containerd's directory, or in the host's Kiln directory. Mounts elsewhere belong to other users
// of the host (tests of other packages running at the same time) and are not compared.
func (e *Env) ownsPath(p string) bool {
	roots := []string{e.Dir, "/run/kiln"}
	if e.Daemon != nil {
		roots = append(roots, e.Daemon.Dir)
	}
	for _, r := range roots {
		if p == r || strings.HasPrefix(p, r+"/") {
			return true
		}
	}
	return false
}

// Diff lists what differs from before to s: "+ links: veth1234" for what appeared, "- ..." for what went.
func (s HostState) Diff(before HostState) []string {
	var d []string
	for _, k := range []struct {
		name        string
		before, now []string
	}{
		{"netns", before.Netns, s.Netns},
		{"links", before.Links, s.Links},
		{"qdiscs", before.Qdiscs, s.Qdiscs},
		{"mounts", before.Mounts, s.Mounts},
		{"kiln state", before.KilnState, s.KilnState},
		{"cni results", before.CNIResults, s.CNIResults},
	} {
		was := count(k.before)
		is := count(k.now)
		for _, v := range k.now {
			if was[v] > 0 {
				was[v]--
				continue
			}
			d = append(d, fmt.Sprintf("+ %s: %s", k.name, v))
		}
		for _, v := range k.before {
			if is[v] > 0 {
				is[v]--
				continue
			}
			d = append(d, fmt.Sprintf("- %s: %s", k.name, v))
		}
	}
	return d
}

func count(l []string) map[string]int {
	m := map[string]int{}
	for _, v := range l {
		m[v]++
	}
	return m
}

// lines runs a command and returns its non-empty output lines.
func lines(name string, args ...string) ([]string, error) {
	out, err := exec.Command(name, args...).Output()
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w", name, strings.Join(args, " "), err)
	}
	var l []string
	for _, s := range strings.Split(string(out), "\n") {
		if s = strings.TrimSpace(s); s != "" {
			l = append(l, s)
		}
	}
	return l, nil
}

// dirNames lists a directory's entries; a missing directory has none.
func dirNames(dir string) []string {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil
	}
	names := make([]string, 0, len(entries))
	for _, e := range entries {
		names = append(names, e.Name())
	}
	return names
}
