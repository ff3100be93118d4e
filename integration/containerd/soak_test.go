package containerd

import (
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// soakCyclesEnv sets how many cycles TestKilnSoak runs: `make soak` asks for 100, `make test` runs
// defaultSoakCycles.
const soakCyclesEnv = "KILN_SOAK_CYCLES"

const defaultSoakCycles = 10

// settleTimeout bounds the wait for what a cycle or an exec released to be gone: shims exiting, descriptors
// closing.
const settleTimeout = time.Minute

func soakCycles(t *testing.T) int {
	t.Helper()
	v := os.Getenv(soakCyclesEnv)
	if v == "" {
		return defaultSoakCycles
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 1 {
		t.Fatalf("%s=%q: want a positive number of cycles", soakCyclesEnv, v)
	}
	return n
}

// hostState is what Kiln's tasks could leak on the host, counted from outside.
type hostState struct {
	// Processes are the live processes whose command line or environment names containerd's directory or the
	// shim's: containerd itself, shims, namespace holders, QEMU, virtiofsd.
	Processes []int
	// Mounts are the mount points under containerd's directory (Kiln's state directory is in it).
	Mounts []string
	// ContainerdFDs is how many descriptors containerd holds, but its splice pipes (see procState).
	ContainerdFDs int
	// StateEntries are the paths below Kiln's state directory.
	StateEntries []string
	// Cgroups are the host cgroups below the harness's containerd namespace, where the shims put their VMs.
	Cgroups []string
}

func (k *kilnEnv) hostState(t *testing.T) hostState {
	t.Helper()
	// The spare shim a cycle's task started is not state that cycle leaves behind (the next takes it): stopped
	// first, so that cycles run on spares and templates alike and every process and entry of theirs is counted.
	if err := StopSpare(k.d.Address, time.Minute); err != nil {
		t.Fatal(err)
	}
	var s hostState
	// With the separator, so that another containerd's /tmp/kctrd-12345 does not match this one's /tmp/kctrd-1234.
	s.Processes = liveProcessesNaming(k.d.Dir+"/", k.shimDir+"/")
	s.Mounts, _ = MountsUnder(k.d.Dir)
	p, err := readProc(k.d.Pid())
	if err != nil {
		t.Fatalf("containerd: %v", err)
	}
	s.ContainerdFDs = p.FDs
	s.StateEntries = pathsBelow(k.d.StateDir(), false)
	s.Cgroups = pathsBelow(namespaceCgroup(), true)
	return s
}

// pathsBelow lists the paths below root, relative to it (only directories when dirs is set); none when root
// does not exist.
func pathsBelow(root string, dirs bool) []string {
	var paths []string
	_ = filepath.WalkDir(root, func(path string, e fs.DirEntry, err error) error {
		if err == nil && path != root && (!dirs || e.IsDir()) {
			rel, _ := filepath.Rel(root, path)
			paths = append(paths, rel)
		}
		return nil
	})
	return paths
}

// namespaceCgroup is the host cgroup that containerd's spec puts the harness's containers under (memory
// controller on cgroup v1).
func namespaceCgroup() string {
	if _, err := os.Stat("/sys/fs/cgroup/cgroup.controllers"); err == nil {
		return filepath.Join("/sys/fs/cgroup", Namespace)
	}
	return filepath.Join("/sys/fs/cgroup/memory", Namespace)
}

func (s hostState) String() string {
	return fmt.Sprintf("processes %v, mounts %v, containerd fds %d, state dir entries %v, cgroups %v",
		s.Processes, s.Mounts, s.ContainerdFDs, s.StateEntries, s.Cgroups)
}

// shimState is what one shim could leak while its container runs execs: its descriptors, and its QEMU's.
// Neither its goroutines nor its threads are compared: the shim exposes no count of its goroutines (a goroutine
// that leaks almost always holds a descriptor, which is counted), and the Go runtime starts a thread whenever
// every thread is busy or blocked, and keeps it, so the count grows with the host's load, not with leaks. The
// threads are logged.
type shimState struct {
	FDs, QEMUFDs int
}

// waitSettled polls until read returns want, and fails the test with the last reading when settleTimeout passes.
func waitSettled[T any](t *testing.T, what string, want T, read func() T) T {
	t.Helper()
	deadline := time.Now().Add(settleTimeout)
	for {
		got := read()
		if reflect.DeepEqual(got, want) {
			return got
		}
		if time.Now().After(deadline) {
			t.Errorf("%s did not come back to its baseline within %s:\nbaseline: %+v\nnow:      %+v", what, settleTimeout, want, got)
			return got
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// steady reads until two readings 200 ms apart agree, so that a baseline is not taken while something winds
// down.
func steady[T any](t *testing.T, what string, read func() T) T {
	t.Helper()
	deadline := time.Now().Add(settleTimeout)
	prev := read()
	for {
		time.Sleep(200 * time.Millisecond)
		cur := read()
		if reflect.DeepEqual(cur, prev) {
			return cur
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s kept changing for %s: %+v", what, settleTimeout, cur)
		}
		prev = cur
	}
}

// TestKilnSoak: cycles of `ctr run -d`, `ctr task exec`, `ctr task kill`, `ctr task delete` and `ctr container
// delete` bring the host back to where it was: the same processes, mounts, containerd descriptors and entries in
// Kiln's state directory. Then as many execs in one container leave its shim's descriptors and threads, and its
// QEMU's descriptors, as they were. Each baseline is taken after one warm-up round, so that what containerd or
// the shim sets up once (clients, connections kept for later) is not taken for a leak; after it, nothing may
// grow.
func TestKilnSoak(t *testing.T) {
	k := startKiln(t)
	cycles := soakCycles(t)
	t.Run("cycles", func(t *testing.T) {
		var current string
		t.Cleanup(func() {
			if current != "" {
				k.remove(t, current)
			}
		})
		cycle := func(i int) {
			current = fmt.Sprintf("kiln-soak-%d", i)
			k.ctr(t, append(append(append([]string{"run", "-d"}, KilnRunArgs(k.cfg)...), BusyboxRef, current), sleeper...)...)
			k.waitStatus(t, current, "RUNNING")
			if out := k.ctr(t, "tasks", "exec", "--exec-id", "soak", current, "echo", current); strings.TrimSpace(out) != current {
				t.Fatalf("cycle %d: exec printed %q", i, out)
			}
			k.ctr(t, "tasks", "kill", current)
			k.waitStatus(t, current, "STOPPED")
			k.ctr(t, "tasks", "delete", current)
			k.ctr(t, "containers", "delete", current)
			current = ""
		}
		cycle(0)
		read := func() hostState { return k.hostState(t) }
		baseline := steady(t, "host state", read)
		t.Logf("baseline after a warm-up cycle: %v", baseline)
		start := time.Now()
		for i := 1; i <= cycles; i++ {
			cycle(i)
		}
		elapsed := time.Since(start)
		after := waitSettled(t, "host state", baseline, read)
		t.Logf("after %d cycles (%s, %s a cycle): %v", cycles, elapsed.Round(time.Second), (elapsed / time.Duration(cycles)).Round(time.Millisecond), after)
	})
	t.Run("execs", func(t *testing.T) {
		// Without spares: a shim holds the gate of the spare it started until 2 s after its first container
		// started (runtime/task's spareDelay), a descriptor that goes on its own, after or before the baseline;
		// and the spare's QEMU would share the state directory.
		cfg, err := k.d.KilnConfig(k.assets, "[hypervisor]\nspare = false\n")
		if err != nil {
			t.Fatal(err)
		}
		k.cfg = cfg
		const id = "kiln-soak-exec"
		k.runDetached(t, id, nil, sleeper...)
		k.waitStatus(t, id, "RUNNING")
		// A spare the cycles' shims left would have a QEMU under the same state directory.
		if err := StopSpare(k.d.Address, time.Minute); err != nil {
			t.Fatal(err)
		}
		shims := k.d.Shims()
		if len(shims) != 1 {
			t.Fatalf("want one shim, found %v", shims)
		}
		qemus := qemuOf(k.d.StateDir())
		if len(qemus) != 1 {
			t.Fatalf("want one QEMU under %s, found %v", k.d.StateDir(), qemus)
		}
		read := func() shimState {
			shim, err := readProc(shims[0])
			if err != nil {
				t.Fatalf("shim: %v", err)
			}
			qemu, err := readProc(qemus[0])
			if err != nil {
				t.Fatalf("QEMU: %v", err)
			}
			return shimState{FDs: shim.FDs, QEMUFDs: qemu.FDs + qemu.SelfPipeFDs}
		}
		threads := func() string {
			p, err := readProc(shims[0])
			if err != nil {
				t.Fatalf("shim: %v", err)
			}
			return fmt.Sprintf("shim threads %d, shim descriptors of the runtime's splice pipes %d", p.Threads, p.SelfPipeFDs)
		}
		exec := func(i int) {
			want := fmt.Sprintf("exec-%d", i)
			if out := k.ctr(t, "tasks", "exec", "--exec-id", want, id, "echo", want); strings.TrimSpace(out) != want {
				t.Fatalf("exec %d printed %q", i, out)
			}
		}
		exec(0)
		baseline := steady(t, "shim state", read)
		baselineFDs := strings.Join(fdTargets(shims[0]), "\n")
		t.Logf("baseline after a warm-up exec: %+v (%s)", baseline, threads())
		start := time.Now()
		for i := 1; i <= cycles; i++ {
			exec(i)
		}
		elapsed := time.Since(start)
		after := waitSettled(t, "shim state", baseline, read)
		t.Logf("after %d execs (%s): %+v (%s)", cycles, elapsed.Round(time.Second), after, threads())
		if t.Failed() {
			t.Logf("shim descriptors at the baseline:\n%s\nnow:\n%s", baselineFDs, strings.Join(fdTargets(shims[0]), "\n"))
		}
	})
}

// procState is what a process holds, as /proc shows it.
type procState struct {
	// FDs counts its descriptors but SelfPipeFDs.
	FDs int
	// SelfPipeFDs counts the descriptors of pipes whose both ends it holds. In a Go program these are the
	// pipes of the runtime's splice pool (internal/poll), which an io.Copy from a socket to a file borrows and
	// which the garbage collector closes when it next runs: how many are open follows the collector, not the
	// work done, and a copy that never ends holds its socket, which FDs counts.
	SelfPipeFDs int
	Threads     int
}

func readProc(pid int) (procState, error) {
	var s procState
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	entries, err := os.ReadDir(dir)
	if err != nil {
		return s, fmt.Errorf("list descriptors of %d: %w", pid, err)
	}
	pipes := map[string]int{}
	for _, e := range entries {
		target, err := os.Readlink(filepath.Join(dir, e.Name()))
		if err != nil {
			continue // closed since the listing
		}
		if strings.HasPrefix(target, "pipe:") {
			pipes[target]++
		}
		s.FDs++
	}
	for _, n := range pipes {
		if n > 1 {
			s.SelfPipeFDs += n
		}
	}
	s.FDs -= s.SelfPipeFDs
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return s, fmt.Errorf("read status of %d: %w", pid, err)
	}
	for _, line := range strings.Split(string(status), "\n") {
		if v, ok := strings.CutPrefix(line, "Threads:"); ok {
			if s.Threads, err = strconv.Atoi(strings.TrimSpace(v)); err != nil {
				return s, fmt.Errorf("threads of %d: %q", pid, line)
			}
		}
	}
	return s, nil
}

// fdTargets lists what a process's descriptors point at, for a failure's message.
func fdTargets(pid int) []string {
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	entries, _ := os.ReadDir(dir)
	targets := make([]string, 0, len(entries))
	for _, e := range entries {
		target, _ := os.Readlink(filepath.Join(dir, e.Name()))
		targets = append(targets, e.Name()+" -> "+target)
	}
	return targets
}

// liveProcessesNaming lists, sorted, the processes other than this one and zombies (this machine's PID 1 does not
// reap them) whose command line or environment contains one of substrs.
func liveProcessesNaming(substrs ...string) []int {
	matches, _ := filepath.Glob("/proc/[0-9]*")
	var pids []int
	for _, dir := range matches {
		pid, err := strconv.Atoi(filepath.Base(dir))
		if err != nil || pid == os.Getpid() || zombie(dir) {
			continue
		}
		cmdline, _ := os.ReadFile(filepath.Join(dir, "cmdline"))
		environ, _ := os.ReadFile(filepath.Join(dir, "environ"))
		for _, s := range substrs {
			if strings.Contains(string(cmdline), s) || strings.Contains(string(environ), s) {
				pids = append(pids, pid)
				break
			}
		}
	}
	slices.Sort(pids)
	return pids
}

func zombie(procDir string) bool {
	b, err := os.ReadFile(filepath.Join(procDir, "stat"))
	if err != nil {
		return true
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	return i >= 0 && strings.HasPrefix(s[i+1:], " Z")
}

// qemuOf lists the QEMU processes whose environment names stateDir (QEMU names its VM's state directory there).
func qemuOf(stateDir string) []int {
	var ours []int
	for _, pid := range ProcessesMatching("qemu-system") {
		if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", pid)); err == nil && strings.Contains(string(b), stateDir) {
			ours = append(ours, pid)
		}
	}
	return ours
}
