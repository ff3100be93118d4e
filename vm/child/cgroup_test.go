package child

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/kiln-runtime/kiln/vm/confine"
)

func TestParseHost(t *testing.T) {
	const v1Mounts = `30 25 0:26 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755
31 30 0:27 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
32 30 0:28 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
33 30 0:29 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids
34 30 0:30 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
`
	const v2Mounts = `40 25 0:40 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate
`
	for _, tc := range []struct {
		name, mountinfo, cgroup string
		v2                      bool
		memDir, v2Parent        string
		errPart                 string
	}{
		{
			name: "v1 (hybrid: the empty cgroup2 is ignored)", mountinfo: v1Mounts,
			cgroup: "4:memory:/pod/shim\n3:cpu,cpuacct:/pod/shim\n2:pids:/\n0::/\n",
			memDir: "/sys/fs/cgroup/memory/pod/shim",
		},
		{
			name: "v1 in a cgroup namespace", mountinfo: strings.Replace(v1Mounts, "0:28 / /sys/fs/cgroup/memory", "0:28 /pod /sys/fs/cgroup/memory", 1),
			cgroup: "4:memory:/pod/shim\n", memDir: "/sys/fs/cgroup/memory/shim",
		},
		{name: "v2 beside the caller", mountinfo: v2Mounts, cgroup: "0::/kubepods/pod1/sandbox\n", v2: true, v2Parent: "/sys/fs/cgroup/kubepods/pod1"},
		{name: "v2 caller in the root", mountinfo: v2Mounts, cgroup: "0::/\n", v2: true, v2Parent: "/sys/fs/cgroup"},
		{name: "no cgroups", mountinfo: "1 0 0:1 / / rw - ext4 /dev/sda rw\n", cgroup: "0::/\n", errPart: "no cgroup"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h, err := parseHost(tc.mountinfo, tc.cgroup)
			if tc.errPart != "" {
				if err == nil || !strings.Contains(err.Error(), tc.errPart) {
					t.Fatalf("err %v, want one containing %q", err, tc.errPart)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if h.v2 != tc.v2 {
				t.Fatalf("v2 = %v", h.v2)
			}
			if tc.v2 {
				if p, _ := h.v2Parent(); p != tc.v2Parent {
					t.Errorf("v2 parent %s, want %s", p, tc.v2Parent)
				}
				return
			}
			if h.v1Dirs["memory"] != tc.memDir {
				t.Errorf("memory dir %s, want %s", h.v1Dirs["memory"], tc.memDir)
			}
		})
	}
}

func TestNewCgroupRefusesBadNames(t *testing.T) {
	for _, n := range []string{"", "a/b", "..", "."} {
		if _, err := NewCgroup(n, 1<<20); err == nil {
			t.Errorf("name %q accepted", n)
		}
	}
	if _, err := NewCgroup("x", 0); err == nil {
		t.Error("zero limit accepted")
	}
}

// A program started with Config.Cgroup and Config.Credential is in the cgroup from its start, as that user,
// with the limit; the starting thread is back where it was; Remove leaves nothing.
func TestStartInCgroupAsUser(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to create cgroups and switch users")
	}
	// Confined, the forking thread enters a v1 cgroup before its confinement and is put back by another.
	for _, confined := range []bool{false, true} {
		t.Run(fmt.Sprintf("confined=%t", confined), func(t *testing.T) { startInCgroupAsUser(t, confined) })
	}
}

func startInCgroupAsUser(t *testing.T, confined bool) {
	name := fmt.Sprintf("kiln-child-test-%d-%t", os.Getpid(), confined)
	const limit = 64 << 20
	cg, err := NewCgroup(name, limit)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cg.Remove() })
	checkVersion(t, cg)
	before, _ := os.ReadFile("/proc/self/cgroup")

	// The program reports its own cgroup file and ids, then its child's cgroup file (what it forks stays in).
	cfg := shell(`cat /proc/self/cgroup; id -u; id -g; echo ===; sh -c 'cat /proc/self/cgroup'; echo end; sleep 60`)
	var out syncBuffer
	cfg.Stdout = &out
	cfg.Cgroup = cg
	cfg.Credential = &syscall.Credential{Uid: 65534, Gid: 65534}
	if confined {
		cfg.Confine = func(writes []string) error { _, err := confine.Policy{Writable: writes}.Thread(); return err }
	}
	p := start(t, cfg)

	var text string
	waitFor(t, func() bool { text = out.String(); return strings.HasSuffix(text, "end\n") })
	// /proc/<pid>/cgroup names the cgroup on the memory hierarchy's line (v1) or the one "0::" line (v2).
	inCgroup := func(cgroupFile string) bool {
		for _, line := range strings.Split(cgroupFile, "\n") {
			parts := strings.SplitN(line, ":", 3)
			if len(parts) != 3 || !strings.HasSuffix(parts[2], "/"+name) {
				continue
			}
			if (cg.V2() && parts[0] == "0" && parts[1] == "") || (!cg.V2() && hasWord(strings.ReplaceAll(parts[1], ",", " "), "memory")) {
				return true
			}
		}
		return false
	}
	if own, forked, _ := strings.Cut(text, "==="); !inCgroup(own) || !inCgroup(forked) {
		t.Errorf("program output %q: want the program and what it forks in cgroup %s", text, name)
	}
	if !strings.Contains(text, "\n65534\n65534\n") {
		t.Errorf("program output %q: want uid and gid 65534", text)
	}
	procs, err := os.ReadFile(filepath.Join(cg.Path(), "cgroup.procs"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(procs), strconv.Itoa(p.PID())) {
		t.Errorf("cgroup.procs of %s = %q, want pid %d", cg.Path(), procs, p.PID())
	}
	limFile := "memory.limit_in_bytes"
	if cg.V2() {
		limFile = "memory.max"
	}
	if b, err := os.ReadFile(filepath.Join(cg.Path(), limFile)); err != nil || strings.TrimSpace(string(b)) != strconv.Itoa(limit) {
		t.Errorf("%s = %q (%v), want %d", limFile, b, err, limit)
	}
	if after, _ := os.ReadFile("/proc/self/cgroup"); string(after) != string(before) {
		t.Errorf("Kiln's cgroups changed:\n%s\nwas\n%s", after, before)
	}
	if b, _ := os.ReadFile("/proc/thread-self/cgroup"); strings.Contains(string(b), name) {
		t.Errorf("a Kiln thread stayed in the cgroup: %s", b)
	}
	// The thread that forked must have left the cgroup too: it holds no task there but the program's.
	if tasks, err := os.ReadFile(filepath.Join(cg.Path(), "tasks")); err == nil {
		for _, tid := range strings.Fields(string(tasks)) {
			if _, err := os.Stat("/proc/self/task/" + tid); err == nil {
				t.Errorf("Kiln thread %s is in the cgroup", tid)
			}
		}
	}

	p.Kill()
	if err := cg.Remove(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(cg.Path()); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("cgroup %s left: %v", cg.Path(), err)
	}
}

// versionEnv, when set to 1 or 2, is the cgroup version the tests must find: a test run that is there to
// exercise one version's code (integration's TestVMCgroupOnCgroupV2 runs these tests in a cgroup v2 guest)
// must not pass on the other's.
const versionEnv = "KILN_TEST_CGROUP_VERSION"

func checkVersion(t *testing.T, cg *Cgroup) {
	t.Helper()
	t.Logf("cgroup %s (v2: %t)", cg.Path(), cg.V2())
	switch os.Getenv(versionEnv) {
	case "1":
		if cg.V2() {
			t.Fatalf("%s=1 but the cgroup is a v2 one", versionEnv)
		}
	case "2":
		if !cg.V2() {
			t.Fatalf("%s=2 but the cgroup is a v1 one", versionEnv)
		}
	}
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("timed out")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// A cgroup left empty by a program that died before removing it does not keep the next one of that name from
// starting; one that still holds a process does.
func TestNewCgroupReplacesAnEmptyStaleOne(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to create cgroups")
	}
	name := "kiln-stale-test-" + strconv.Itoa(os.Getpid())
	stale, err := NewCgroup(name, 64<<20)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = stale.Remove() })
	checkVersion(t, stale)
	again, err := NewCgroup(name, 64<<20)
	if err != nil {
		t.Fatalf("new cgroup over an empty stale one: %v", err)
	}
	cfg := shell("sleep 60")
	cfg.Cgroup = again
	start(t, cfg)
	if _, err := NewCgroup(name, 64<<20); err == nil {
		t.Error("a cgroup holding a process was replaced")
	}
}

// Background sets the cgroup's CPU weight to the lowest and back to the default, where the cgroup has a CPU weight
// of its own.
func TestCgroupBackground(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to create cgroups")
	}
	cg, err := NewCgroup("kiln-background-test-"+strconv.Itoa(os.Getpid()), 64<<20)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cg.Remove() })
	checkVersion(t, cg)
	weight := func() string {
		t.Helper()
		var path string
		if cg.V2() {
			ctl, err := os.ReadFile(filepath.Join(cg.Path(), "cgroup.controllers"))
			if err != nil {
				t.Fatal(err)
			}
			if !hasWord(string(ctl), "cpu") {
				return "no cpu controller"
			}
			path = filepath.Join(cg.Path(), "cpu.weight")
		} else {
			for i, ctl := range cg.ctls {
				if ctl == "cpu" {
					path = filepath.Join(cg.dirs[i], "cpu.shares")
				}
			}
			if path == "" {
				return "no cpu controller"
			}
		}
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		return strings.TrimSpace(string(b))
	}
	low, usual := "2", "1024"
	if cg.V2() {
		low, usual = "1", "100"
	}
	if weight() == "no cpu controller" {
		if err := cg.Background(true); err != nil {
			t.Fatalf("Background without a cpu controller: %v", err)
		}
		t.Skip("the cgroup has no cpu controller here: nice values alone order its processes")
	}
	if got := weight(); got != usual {
		t.Fatalf("a new cgroup's CPU weight = %s, want the default %s", got, usual)
	}
	if err := cg.Background(true); err != nil {
		t.Fatal(err)
	}
	if got := weight(); got != low {
		t.Errorf("CPU weight in the background = %s, want %s", got, low)
	}
	if err := cg.Background(false); err != nil {
		t.Fatal(err)
	}
	if got := weight(); got != usual {
		t.Errorf("CPU weight back in the foreground = %s, want %s", got, usual)
	}
}

// A program that outgrows its cgroup's limit is killed by the kernel, and the cgroup counts it.
func TestCgroupOOMKills(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to create cgroups")
	}
	cg, err := NewCgroup(fmt.Sprintf("kiln-child-oom-test-%d", os.Getpid()), 16<<20)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cg.Remove() })
	checkVersion(t, cg)
	if n, err := cg.OOMKills(); err != nil || n != 0 {
		t.Fatalf("OOMKills of a new cgroup = %d, %v; want 0", n, err)
	}
	// The shell keeps 64 MB of output in memory, four times the limit.
	cfg := shell(`x=$(head -c 64000000 /dev/zero | tr '\0' a); echo survived`)
	var out syncBuffer
	cfg.Stdout = &out
	cfg.Cgroup = cg
	p := start(t, cfg)
	waitExited(t, p)
	if strings.Contains(out.String(), "survived") {
		t.Fatal("the program outgrew its cgroup's limit and was not killed")
	}
	if n, err := cg.OOMKills(); err != nil || n == 0 {
		t.Errorf("OOMKills after the program was killed = %d, %v; want 1 or more", n, err)
	}
}

// SetLimit changes the limit the kernel enforces, and Limit reports it; a limit of nothing is refused.
func TestCgroupSetLimit(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to create cgroups")
	}
	cg, err := NewCgroup("kiln-setlimit-test-"+strconv.Itoa(os.Getpid()), 64<<20)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cg.Remove() })
	checkVersion(t, cg)
	file := "memory.limit_in_bytes"
	if cg.V2() {
		file = "memory.max"
	}
	read := func() string {
		t.Helper()
		b, err := os.ReadFile(filepath.Join(cg.Path(), file))
		if err != nil {
			t.Fatal(err)
		}
		return strings.TrimSpace(string(b))
	}
	if got := read(); got != strconv.Itoa(64<<20) {
		t.Fatalf("%s = %s at creation, want %d", file, got, 64<<20)
	}
	if err := cg.SetLimit(320 << 20); err != nil {
		t.Fatal(err)
	}
	if got := read(); got != strconv.Itoa(320<<20) || cg.Limit() != 320<<20 {
		t.Errorf("%s = %s, Limit %d after SetLimit(320 MiB)", file, got, cg.Limit())
	}
	if err := cg.SetLimit(0); err == nil || cg.Limit() != 320<<20 {
		t.Errorf("SetLimit(0) = %v, Limit %d", err, cg.Limit())
	}
}
