// Package hostcgroup puts a pod's host processes in the host cgroup its spec names, so that the host accounts
// them to the pod as it would a runc container: the shim moves itself there before it starts QEMU and virtiofsd,
// which inherit it. containerd's pod stats (crictl statsp) and kubelet read the pod's cgroup, the parent of that
// one. It works with cgroup v1 and v2, with cgroupfs paths and with systemd's "slice:prefix:name" form (kubelet's
// systemd cgroup driver, kubeadm's default), which names the cgroup of a scope unit in the slice's cgroup; Kiln
// makes that cgroup itself, as for a cgroupfs path, without asking systemd for the unit (SystemdPath).
package hostcgroup

import (
	"errors"
	"fmt"
	"os"
	"path"
	"strconv"
	"strings"

	"github.com/containerd/cgroups/v3"
	"github.com/containerd/cgroups/v3/cgroup1"
	"github.com/containerd/cgroups/v3/cgroup2"
	"github.com/opencontainers/cgroups/systemd"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// SystemdPath turns a cgroup path in systemd's form, "<slice>:<prefix>:<name>" (what containerd's CRI gives a
// container when kubelet's cgroup parent is a systemd slice), into the cgroupfs path systemd gives the scope unit
// <prefix>-<name>.scope in that slice: the slice expanded by systemd's naming ("kubepods-burstable-pod1.slice" is
// /kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice), the scope below it. A name that is
// itself a slice is the unit. An empty slice is system.slice, as for runc.
func SystemdPath(p string) (string, error) {
	parts := strings.Split(p, ":")
	if len(parts) != 3 || parts[2] == "" || strings.ContainsAny(parts[1]+parts[2], "/") {
		return "", fmt.Errorf("cgroup %q: want systemd's form <slice>:<prefix>:<name>", p)
	}
	slice, prefix, name := parts[0], parts[1], parts[2]
	if slice == "" {
		slice = "system.slice"
	}
	dir, err := systemd.ExpandSlice(slice)
	if err != nil {
		return "", fmt.Errorf("cgroup %q: %w", p, err)
	}
	unit := name
	if !strings.HasSuffix(name, ".slice") {
		unit = prefix + "-" + name + ".scope" // as runc names it, even with no prefix
	}
	return path.Join(dir, unit), nil
}

// Group is the host cgroup a process entered, and the way back.
type Group struct {
	path  string
	pid   int
	v1    cgroup1.Cgroup
	v1Was cgroup1.Cgroup
	v2    *cgroup2.Manager
	v2Was *cgroup2.Manager
	// oomBase is the group's count of OOM kills when Enter found or made it.
	oomBase uint64
}

// Enter creates the cgroup at p (absolute, cgroupfs form, or systemd's: SystemdPath) and moves process pid into
// it, remembering where it was. The processes in trees go too, each with every process below it: a spare shim's
// QEMU and virtiofsd, started before it knew its pod. Leave takes back only pid.
func Enter(p string, pid int, trees ...int) (*Group, error) {
	if strings.Contains(p, ":") {
		fs, err := SystemdPath(p)
		if err != nil {
			return nil, err
		}
		p = fs
	}
	if !path.IsAbs(p) || path.Clean(p) == "/" {
		return nil, fmt.Errorf("cgroup %q: want an absolute path below the root", p)
	}
	p = path.Clean(p)
	g := &Group{path: p, pid: pid}
	if cgroups.Mode() == cgroups.Unified {
		was, err := cgroup2.PidGroupPath(pid)
		if err != nil {
			return nil, fmt.Errorf("find cgroup of process %d: %w", pid, err)
		}
		if g.v2Was, err = cgroup2.Load(was); err != nil {
			return nil, fmt.Errorf("load cgroup %s: %w", was, err)
		}
		if g.v2, err = cgroup2.NewManager("/sys/fs/cgroup", p, &cgroup2.Resources{}); err != nil {
			return nil, fmt.Errorf("create cgroup %s: %w", p, err)
		}
	} else {
		var err error
		if g.v1Was, err = cgroup1.Load(cgroup1.PidPath(pid)); err != nil {
			return nil, fmt.Errorf("load cgroup of process %d: %w", pid, err)
		}
		if g.v1, err = cgroup1.New(cgroup1.StaticPath(p), &specs.LinuxResources{}); err != nil {
			return nil, fmt.Errorf("create cgroup %s: %w", p, err)
		}
	}
	// Kills before the pod's processes came (a cgroup kubelet made, and gave to another pod before) are not its.
	g.oomBase, _ = g.oomKills()
	if err := g.add(pid); err != nil {
		_ = g.delete()
		return nil, fmt.Errorf("move process %d to cgroup %s: %w", pid, p, err)
	}
	if err := g.moveTrees(trees); err != nil {
		_ = g.Leave()
		return nil, err
	}
	return g, nil
}

// add moves process pid into the group.
func (g *Group) add(pid int) error {
	if g.v2 != nil {
		return g.v2.AddProc(uint64(pid))
	}
	return g.v1.AddProc(uint64(pid))
}

// delete removes the group's cgroup, which must hold no process.
func (g *Group) delete() error {
	if g.v2 != nil {
		return g.v2.Delete()
	}
	return g.v1.Delete()
}

// moveTrees moves each process of roots, and every process below it (found through /proc/PID/task/*/children),
// into the group.
func (g *Group) moveTrees(roots []int) error {
	for _, root := range roots {
		for _, pid := range append([]int{root}, Descendants(root)...) {
			// A process that has just exited is not in the way.
			if err := g.add(pid); err != nil && processExists(pid) {
				return fmt.Errorf("move process %d to cgroup %s: %w", pid, g.path, err)
			}
		}
	}
	return nil
}

// Descendants lists the processes below pid, parents before their children (through /proc/PID/task/*/children).
func Descendants(pid int) []int {
	var out []int
	queue := []int{pid}
	for len(queue) > 0 {
		p := queue[0]
		queue = queue[1:]
		tasks, _ := os.ReadDir(fmt.Sprintf("/proc/%d/task", p))
		for _, t := range tasks {
			b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/children", p, t.Name()))
			if err != nil {
				continue
			}
			for _, f := range strings.Fields(string(b)) {
				if c, err := strconv.Atoi(f); err == nil {
					out = append(out, c)
					queue = append(queue, c)
				}
			}
		}
	}
	return out
}

func processExists(pid int) bool {
	_, err := os.Stat(fmt.Sprintf("/proc/%d", pid))
	return err == nil
}

// Path is the cgroup's path.
func (g *Group) Path() string { return g.path }

// OOMKills is how many processes of the group the kernel's OOM killer has killed since Enter (the group's
// memory.events' oom_kill on v2, memory.oom_control's on v1, which count a kill for any limit, hierarchically).
func (g *Group) OOMKills() (uint64, error) {
	n, err := g.oomKills()
	if err != nil {
		return 0, fmt.Errorf("cgroup %s: %w", g.path, err)
	}
	return n - min(n, g.oomBase), nil
}

func (g *Group) oomKills() (uint64, error) {
	if g.v2 != nil {
		m, err := g.v2.StatFiltered(cgroup2.StatMemoryEvents)
		if err != nil {
			return 0, err
		}
		return m.GetMemoryEvents().GetOomKill(), nil
	}
	m, err := g.v1.Stat(cgroup1.IgnoreNotExist)
	if err != nil {
		return 0, err
	}
	return m.GetMemoryOomControl().GetOomKill(), nil
}

// Leave moves the process back to where it was and removes the cgroup, which must hold nothing else by then
// (QEMU and virtiofsd have exited).
func (g *Group) Leave() error {
	var err error
	if g.v2 != nil {
		err = g.v2Was.AddProc(uint64(g.pid))
	} else {
		err = g.v1Was.AddProc(uint64(g.pid))
	}
	if err == nil {
		err = g.delete()
	}
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("leave cgroup %s: %w", g.path, err)
	}
	return nil
}

// Remove removes the cgroup at p, left by a process that was killed before Leave; its processes must be gone.
// A cgroup that does not exist is not an error.
func Remove(p string) error {
	if strings.Contains(p, ":") || !path.IsAbs(p) || path.Clean(p) == "/" {
		return nil
	}
	var err error
	if cgroups.Mode() == cgroups.Unified {
		var m *cgroup2.Manager
		if m, err = cgroup2.Load(path.Clean(p)); err == nil {
			err = m.Delete()
		}
	} else {
		var cg cgroup1.Cgroup
		if cg, err = cgroup1.Load(cgroup1.StaticPath(path.Clean(p))); err == nil {
			err = cg.Delete()
		}
	}
	if err != nil && !errors.Is(err, os.ErrNotExist) && !errors.Is(err, cgroup1.ErrCgroupDeleted) {
		return fmt.Errorf("remove cgroup %s: %w", p, err)
	}
	return nil
}
