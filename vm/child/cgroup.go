package child

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kiln-runtime/kiln/kernfs"
)

// Cgroup is a cgroup of Kiln's making that programs are started in (Config.Cgroup): a VM's QEMU and virtiofsd
// share one, so the host charges what a guest costs to it and bounds its memory. It works on cgroup v1 (one
// directory per hierarchy) and v2; it knows nothing of pods or of the host cgroup a spec names.
//
// Where it is made: on v1, below the calling process's own cgroup in each hierarchy (memory, and cpu, cpuacct,
// pids where mounted), so a pod's shim and its VM stay under the pod. On v2 a cgroup that holds processes cannot
// also hand the memory controller to a child, so the cgroup is made beside the calling process's cgroup (under
// its parent, which already delegates memory to it), or below the root when the caller is in the root.
//
// How programs enter it: at fork, never after exec, so nothing the program allocates or forks escapes it. v2
// uses clone3's CLONE_INTO_CGROUP; v1 has no such flag, so the forking thread enters the cgroup for the
// duration of the fork and goes back (v1 membership is per thread, and a child starts in its forking thread's
// cgroups).
type Cgroup struct {
	v2   bool
	name string
	// dirs are the cgroup's directories: one per v1 hierarchy, or the one v2 directory.
	dirs []string
	// ctls (v1) names a controller of each of dirs' hierarchies, mounts (v1) their mount points.
	ctls, mounts []string
	// limit is the memory limit in bytes (SetLimit changes it while the cgroup's programs run).
	limit atomic.Int64
}

// v1Controllers are the v1 hierarchies a Cgroup spans; memory is required, the others are used where mounted.
var v1Controllers = []string{"memory", "cpu", "cpuacct", "pids"}

// CgroupInfo says which cgroup version applies and where Kiln's cgroups go, for `kiln check`.
func CgroupInfo() (string, error) {
	h, err := readHost()
	if err != nil {
		return "", err
	}
	if h.v2 {
		parent, err := h.v2Parent()
		if err != nil {
			return "", err
		}
		return "cgroup v2: VM cgroups under " + parent, nil
	}
	return "cgroup v1: VM cgroups below the shim's memory cgroup " + h.v1Dirs["memory"], nil
}

// NewCgroup creates the cgroup name (one path element) with a memory limit of limitBytes. Remove removes it.
func NewCgroup(name string, limitBytes int64) (*Cgroup, error) {
	if name == "" || strings.ContainsAny(name, "/") || name == "." || name == ".." {
		return nil, fmt.Errorf("cgroup name %q: want one path element", name)
	}
	if limitBytes <= 0 {
		return nil, fmt.Errorf("cgroup %s: memory limit %d: want a positive number of bytes", name, limitBytes)
	}
	h, err := readHost()
	if err != nil {
		return nil, fmt.Errorf("create cgroup %s: %w", name, err)
	}
	c := &Cgroup{v2: h.v2, name: name}
	c.limit.Store(limitBytes)
	if h.v2 {
		parent, err := h.v2Parent()
		if err != nil {
			return nil, fmt.Errorf("create cgroup %s: %w", name, err)
		}
		c.dirs = []string{filepath.Join(parent, name)}
	} else {
		seen := map[string]bool{}
		for _, ctl := range v1Controllers {
			d, ok := h.v1Dirs[ctl]
			if !ok || seen[d] {
				continue // not mounted, or co-mounted with one already listed (cpu,cpuacct)
			}
			seen[d] = true
			c.dirs = append(c.dirs, filepath.Join(d, name))
			c.ctls = append(c.ctls, ctl)
			c.mounts = append(c.mounts, h.mountOf(d))
		}
	}
	if err := c.create(h); err != nil {
		_ = c.Remove()
		return nil, fmt.Errorf("create cgroup %s: %w", name, err)
	}
	return c, nil
}

func (c *Cgroup) create(h host) error {
	if c.v2 {
		parent := filepath.Dir(c.dirs[0])
		ctl, err := os.ReadFile(filepath.Join(parent, "cgroup.subtree_control"))
		if err != nil {
			return err
		}
		if !hasWord(string(ctl), "memory") {
			if err := os.WriteFile(filepath.Join(parent, "cgroup.subtree_control"), []byte("+memory"), 0); err != nil {
				if errors.Is(err, unix.EBUSY) {
					// The caller is at the root of a cgroup namespace that is not the host's root cgroup.
					return fmt.Errorf("enable the memory controller in %s: %w: it holds processes, and cgroup v2 lets such a cgroup give no controller to its children; run Kiln's shim in a cgroup of its own below it", parent, err)
				}
				return fmt.Errorf("enable the memory controller in %s: %w", parent, err)
			}
		}
	}
	for _, d := range c.dirs {
		err := os.Mkdir(d, 0o755)
		if errors.Is(err, os.ErrExist) && unix.Rmdir(d) == nil {
			// Left by a program of the same name that died before anyone removed its cgroup: rmdir takes an
			// empty cgroup only, never one holding a process or a cgroup.
			err = os.Mkdir(d, 0o755)
		}
		if err != nil {
			return err
		}
	}
	return c.writeLimit(c.limit.Load())
}

// writeLimit sets the cgroup's memory limit: memory.max on v2, memory.limit_in_bytes on v1.
func (c *Cgroup) writeLimit(bytes int64) error {
	file := "memory.limit_in_bytes"
	if c.v2 {
		file = "memory.max"
	}
	return kernfs.Write(filepath.Join(c.Path(), file), strconv.FormatInt(bytes, 10))
}

// SetLimit changes the cgroup's memory limit to limitBytes while its programs run.
func (c *Cgroup) SetLimit(limitBytes int64) error {
	if limitBytes <= 0 {
		return fmt.Errorf("cgroup %s: memory limit %d: want a positive number of bytes", c.name, limitBytes)
	}
	if err := c.writeLimit(limitBytes); err != nil {
		return fmt.Errorf("cgroup %s: set its memory limit to %d bytes: %w", c.name, limitBytes, err)
	}
	c.limit.Store(limitBytes)
	return nil
}

// Background puts the cgroup behind its siblings for CPU (on: the lowest weight), or back beside them (off: the
// default weight). A nice value orders a process only against the others of its CPU cgroup; the cgroup competes
// with its siblings (other VMs' cgroups, pods' cgroups, the processes beside it on v1) by its weight, so a VM
// meant to take only CPU nothing else wants needs both. Without the cpu controller (a v2 parent that does not
// delegate it) the cgroup's processes are scheduled as part of the parent, where their nice value applies, and
// there is nothing to do.
func (c *Cgroup) Background(on bool) error {
	if c.v2 {
		ctl, err := os.ReadFile(filepath.Join(c.dirs[0], "cgroup.controllers"))
		if err != nil {
			return fmt.Errorf("cgroup %s: %w", c.name, err)
		}
		if !hasWord(string(ctl), "cpu") {
			return nil
		}
		weight := "100"
		if on {
			weight = "1"
		}
		return kernfs.Write(filepath.Join(c.dirs[0], "cpu.weight"), weight)
	}
	for i, ctl := range c.ctls {
		if ctl == "cpu" {
			shares := "1024"
			if on {
				shares = "2"
			}
			return kernfs.Write(filepath.Join(c.dirs[i], "cpu.shares"), shares)
		}
	}
	return nil
}

// Path is the cgroup's directory: the v2 one, or the v1 memory hierarchy's.
func (c *Cgroup) Path() string {
	if c.v2 {
		return c.dirs[0]
	}
	for i, ctl := range c.ctls {
		if ctl == "memory" {
			return c.dirs[i]
		}
	}
	return c.dirs[0]
}

// OOMKills is how many of the cgroup's processes the kernel's OOM killer has killed, for the cgroup's own limit or
// any other (an ancestor's, the host's): oom_kill in memory.events on v2, in memory.oom_control on v1.
func (c *Cgroup) OOMKills() (uint64, error) {
	file := "memory.oom_control"
	if c.v2 {
		file = "memory.events"
	}
	path := filepath.Join(c.Path(), file)
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, fmt.Errorf("cgroup %s: %w", c.name, err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "oom_kill "); ok {
			n, err := strconv.ParseUint(strings.TrimSpace(v), 10, 64)
			if err != nil {
				return 0, fmt.Errorf("cgroup %s: %s: oom_kill %q: %w", c.name, path, v, err)
			}
			return n, nil
		}
	}
	return 0, fmt.Errorf("cgroup %s: %s counts no oom_kill (Linux 4.13 or later does)", c.name, path)
}

// V2 reports whether the cgroup is a cgroup v2 one.
func (c *Cgroup) V2() bool { return c.v2 }

// Limit is the memory limit in bytes.
func (c *Cgroup) Limit() int64 { return c.limit.Load() }

// Dirs are the cgroup's directories: the v2 one, or one per v1 hierarchy.
func (c *Cgroup) Dirs() []string { return append([]string(nil), c.dirs...) }

// Remove removes the cgroup; the programs started in it must have exited. See RemoveDirs.
func (c *Cgroup) Remove() error { return RemoveDirs(c.dirs) }

// RemoveDirs removes cgroup directories, which must hold no process and no cgroup below them (it only ever
// removes empty directories). A process that has just been reaped may still be leaving one, so an EBUSY is
// retried for a moment. Removing a cgroup that is gone is not an error.
func RemoveDirs(dirs []string) error {
	var errs []error
	for _, d := range dirs {
		var err error
		for i := 0; i < 50; i++ {
			err = unix.Rmdir(d)
			if !errors.Is(err, unix.EBUSY) {
				break
			}
			time.Sleep(10 * time.Millisecond)
		}
		if err != nil && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("remove cgroup %s: %w", d, err))
		}
	}
	return errors.Join(errs...)
}

// start runs start (which forks) so that the new process begins life in the cgroup. attr is the command's
// SysProcAttr, which on v2 gets the cgroup's descriptor.
func (c *Cgroup) start(attr *syscall.SysProcAttr, start func() error) error {
	if c.v2 {
		fd, err := unix.Open(c.dirs[0], unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("open cgroup %s: %w", c.dirs[0], err)
		}
		defer unix.Close(fd)
		attr.UseCgroupFD = true
		attr.CgroupFD = fd
		return start()
	}
	// v1: the forking thread enters the cgroup and leaves it again. The thread is locked meanwhile so the
	// goroutine forks from it and no other goroutine runs on it while it is inside.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	leave, err := c.enterThread()
	if err != nil {
		return err
	}
	defer leave()
	return start()
}

// enterThread puts the calling thread, on cgroup v1, into the cgroup, and returns what puts it back where it
// was: a call from any thread (v1 moves a thread by its id). On failure the thread is back already.
func (c *Cgroup) enterThread() (leave func(), err error) {
	tid := strconv.Itoa(unix.Gettid())
	h, err := readHostFor("/proc/thread-self/cgroup")
	if err != nil {
		return nil, err
	}
	was := make([]string, len(c.dirs)) // the thread's own directories, in c.dirs order
	for i, ctl := range c.ctls {
		was[i] = h.v1Dirs[ctl]
	}
	entered := 0
	leave = func() {
		for i := 0; i < entered; i++ {
			// Going back into the cgroup the thread came from cannot fail short of that cgroup being removed
			// under a running Kiln; then the hierarchy's root takes the thread.
			if err := kernfs.Write(filepath.Join(was[i], "tasks"), tid); err != nil {
				_ = kernfs.Write(filepath.Join(c.mounts[i], "tasks"), tid)
			}
		}
	}
	for _, d := range c.dirs {
		if err := kernfs.Write(filepath.Join(d, "tasks"), tid); err != nil {
			leave()
			return nil, fmt.Errorf("enter cgroup %s: %w", d, err)
		}
		entered++
	}
	return leave, nil
}

// host is the calling process's (or thread's) cgroup placement.
type host struct {
	v2 bool
	// v2Dir is the caller's v2 cgroup directory, v2Mount the cgroup2 mount point.
	v2Dir, v2Mount string
	// v1Dirs maps a v1 controller to the caller's directory in its hierarchy; v1Mounts lists hierarchy mounts.
	v1Dirs   map[string]string
	v1Mounts []string
}

func readHost() (host, error) { return readHostFor("/proc/self/cgroup") }

func readHostFor(cgroupFile string) (host, error) {
	mi, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return host{}, err
	}
	cg, err := os.ReadFile(cgroupFile)
	if err != nil {
		return host{}, err
	}
	return parseHost(string(mi), string(cg))
}

// parseHost finds where the caller is from /proc/self/mountinfo and /proc/<pid>/cgroup. A v1 memory hierarchy
// decides for v1 (hybrid hosts mount an empty cgroup2 beside it); otherwise a cgroup2 mount means v2.
func parseHost(mountinfo, cgroupFile string) (host, error) {
	type mnt struct{ root, point string }
	v1 := map[string]mnt{} // controller -> its hierarchy's mount
	var v2 *mnt
	var v1Mounts []string
	for _, line := range strings.Split(mountinfo, "\n") {
		pre, post, ok := strings.Cut(line, " - ")
		if !ok {
			continue
		}
		f, g := strings.Fields(pre), strings.Fields(post)
		if len(f) < 5 || len(g) < 3 {
			continue
		}
		m := mnt{root: f[3], point: unescapeMount(f[4])}
		switch g[0] {
		case "cgroup2":
			if v2 == nil {
				v2 = &m
			}
		case "cgroup":
			v1Mounts = append(v1Mounts, m.point)
			for _, opt := range strings.Split(g[2], ",") {
				if _, dup := v1[opt]; !dup {
					v1[opt] = m
				}
			}
		}
	}
	paths := map[string]string{} // controller ("" for v2) -> path in its hierarchy
	for _, line := range strings.Split(strings.TrimSpace(cgroupFile), "\n") {
		parts := strings.SplitN(line, ":", 3)
		if len(parts) != 3 {
			continue
		}
		if parts[1] == "" {
			paths[""] = parts[2]
			continue
		}
		for _, ctl := range strings.Split(parts[1], ",") {
			paths[ctl] = parts[2]
		}
	}
	under := func(m mnt, p string) string {
		// A cgroup namespace or a bind mount of a sub-tree shows the mount's root; paths are relative to it.
		rel := p
		if m.root != "/" {
			rel = strings.TrimPrefix(p, m.root)
		}
		return filepath.Join(m.point, rel)
	}
	if mem, ok := v1["memory"]; ok {
		h := host{v1Dirs: map[string]string{}, v1Mounts: v1Mounts}
		for _, ctl := range v1Controllers {
			m, ok := v1[ctl]
			p, ok2 := paths[ctl]
			if ok && ok2 {
				h.v1Dirs[ctl] = under(m, p)
			}
		}
		if _, ok := h.v1Dirs["memory"]; !ok {
			return host{}, fmt.Errorf("cgroup v1 memory hierarchy at %s, but no memory line in the process's cgroup file", mem.point)
		}
		return h, nil
	}
	if v2 != nil {
		p, ok := paths[""]
		if !ok {
			return host{}, errors.New("cgroup2 is mounted but the process's cgroup file has no 0:: line")
		}
		return host{v2: true, v2Mount: v2.point, v2Dir: under(*v2, p)}, nil
	}
	return host{}, errors.New("no cgroup v1 memory hierarchy and no cgroup2 mount")
}

// v2Parent is where a v2 Cgroup goes: beside the caller's cgroup, or below the root when the caller is in it.
func (h host) v2Parent() (string, error) {
	if filepath.Clean(h.v2Dir) == filepath.Clean(h.v2Mount) {
		return h.v2Mount, nil
	}
	return filepath.Dir(h.v2Dir), nil
}

// mountOf is the v1 hierarchy mount point dir lies in.
func (h host) mountOf(dir string) string {
	best := ""
	for _, m := range h.v1Mounts {
		if (dir == m || strings.HasPrefix(dir, m+"/")) && len(m) > len(best) {
			best = m
		}
	}
	return best
}

// unescapeMount undoes mountinfo's octal escapes (\040 for a space).
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func hasWord(s, w string) bool {
	sc := bufio.NewScanner(strings.NewReader(s))
	sc.Split(bufio.ScanWords)
	for sc.Scan() {
		if sc.Text() == w {
			return true
		}
	}
	return false
}
