package containerd

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/kiln-runtime/kiln/runtime/task"
	"github.com/kiln-runtime/kiln/vm/qemu"
)

// eventLog follows `ctr events` from its start until stop, keeping every line.
type eventLog struct {
	cmd     *exec.Cmd
	cancel  context.CancelFunc
	mu      sync.Mutex
	lines   []string
	changed chan struct{}
	done    chan struct{}
	once    sync.Once
}

// followEvents starts following containerd's events, and returns once they come through; they are kept until
// stop (or the test's end).
func (k *kilnEnv) followEvents(t *testing.T) *eventLog {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	cmd := k.d.CtrCommand(ctx, "events")
	out, err := cmd.StdoutPipe()
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		cancel()
		t.Fatal(err)
	}
	e := &eventLog{cmd: cmd, cancel: cancel, changed: make(chan struct{}, 1), done: make(chan struct{})}
	go func() {
		defer close(e.done)
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			e.mu.Lock()
			e.lines = append(e.lines, sc.Text())
			e.mu.Unlock()
			select {
			case e.changed <- struct{}{}:
			default:
			}
		}
	}()
	t.Cleanup(e.stop)
	// `ctr events` subscribes some time after it starts, and an event published before that is not shown: label
	// the namespace until the update comes through, so that the caller's next event cannot be missed.
	deadline := time.Now().Add(time.Minute)
	for n := 0; !strings.Contains(e.String(), " /namespaces/update "); n++ {
		if time.Now().After(deadline) {
			t.Fatalf("ctr events showed no /namespaces/update within a minute; events:\n%s", e.String())
		}
		k.ctr(t, "namespaces", "label", Namespace, fmt.Sprintf("kiln.test/events=%d", n))
		select {
		case <-e.changed:
		case <-time.After(200 * time.Millisecond):
		}
	}
	return e
}

// stop ends the follower: `ctr events` names containerd's address as shims do, so a leftover check needs it gone.
func (e *eventLog) stop() {
	e.once.Do(func() {
		e.cancel()
		_ = e.cmd.Wait()
		<-e.done
	})
}

func (e *eventLog) String() string {
	e.mu.Lock()
	defer e.mu.Unlock()
	return strings.Join(e.lines, "\n")
}

// find returns the events seen so far on topic whose payload has fields.
func (e *eventLog) find(topic string, fields map[string]any) []event {
	var out []event
	for _, ev := range parseEvents(e.String()) {
		if ev.Topic == topic && matches(ev.Payload, fields) {
			out = append(out, ev)
		}
	}
	return out
}

// waitFor waits until an event on topic with fields was seen, failing the test after timeout.
func (e *eventLog) waitFor(t *testing.T, timeout time.Duration, topic string, fields map[string]any) event {
	t.Helper()
	deadline := time.After(timeout)
	for {
		if evs := e.find(topic, fields); len(evs) > 0 {
			return evs[0]
		}
		select {
		case <-e.changed:
		case <-deadline:
			t.Fatalf("no %s event with %v within %s; events:\n%s", topic, fields, timeout, e.String())
		}
	}
}

// podArgs are the `ctr run` arguments that put a container into the Kiln pod (one shim, one VM) named pod, as
// CRI's sandbox id does.
func podArgs(pod string) []string {
	return []string{"--annotation", "io.kubernetes.cri.sandbox-id=" + pod}
}

// vmOf is the id of the VM that runs container id, from the record its shim wrote in the task's bundle: a pod
// whose shim was a spare runs in the spare's VM, whose id is not task.VMID's of the pod.
func (k *kilnEnv) vmOf(t *testing.T, id string) string {
	t.Helper()
	rec, err := task.ReadRecord(filepath.Join(k.d.Dir, "state", "io.containerd.runtime.v2.task", Namespace, id))
	if err != nil {
		t.Fatalf("the VM of %s: %v", id, err)
	}
	return rec.VMID
}

// podQEMU is the pid of the QEMU serving the pod of container id, found by the state directory its environment
// names.
func (k *kilnEnv) podQEMU(t *testing.T, id string) int {
	t.Helper()
	pids := qemusIn(filepath.Join(k.d.StateDir(), k.vmOf(t, id)))
	if len(pids) != 1 {
		t.Fatalf("want one QEMU for the pod of %s, found %v", id, pids)
	}
	return pids[0]
}

// qemusIn lists the QEMU processes whose environment names a state directory at or below dir.
func qemusIn(dir string) []int {
	var out []int
	for _, pid := range ProcessesMatching("qemu-system") {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", pid))
		if err != nil {
			continue
		}
		for _, kv := range strings.Split(string(b), "\x00") {
			if v, ok := strings.CutPrefix(kv, qemu.StateDirEnv+"="); ok && (v == dir || strings.HasPrefix(v, dir+"/")) {
				out = append(out, pid)
			}
		}
	}
	return out
}

// podVirtiofsd lists the virtiofsd processes exporting the share of container id's pod (the daemon and its
// sandboxed child).
func (k *kilnEnv) podVirtiofsd(t *testing.T, id string) []int {
	t.Helper()
	var out []int
	for _, pid := range ProcessesMatching(k.vmOf(t, id) + ".share") {
		if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid)); err == nil && strings.Contains(string(b), "virtiofsd") {
			out = append(out, pid)
		}
	}
	if len(out) == 0 {
		t.Fatalf("no virtiofsd serves the pod of %s", id)
	}
	return out
}

// waitShareHolds waits until the share of the pod running container a holds a directory for container id: the
// shim is creating it.
func (k *kilnEnv) waitShareHolds(t *testing.T, a, id string, timeout time.Duration) {
	t.Helper()
	dir := filepath.Join(k.d.StateDir(), k.vmOf(t, a)+".share", "mounts", id)
	deadline := time.Now().Add(timeout)
	for {
		if _, err := os.Stat(dir); err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the share never held %s", dir)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// waitStatusWithin is waitStatus with a bound of the caller's.
func (k *kilnEnv) waitStatusWithin(t *testing.T, id, status string, timeout time.Duration) {
	t.Helper()
	if got, ok := k.pollStatus(t, id, timeout, func(st string) bool { return st == status }); !ok {
		t.Fatalf("task %s: status %q after %s, want %q", id, got, timeout, status)
	}
}

// shimProcesses are this containerd's shims, without the ctr processes that name its address too.
func (k *kilnEnv) shimProcesses() []int {
	var out []int
	for _, pid := range k.d.Shims() {
		if exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid)); err == nil && filepath.Base(exe) == ShimBinary {
			out = append(out, pid)
		}
	}
	return out
}

// waitGoneOrStopped waits until the task is stopped or containerd no longer lists it.
func (k *kilnEnv) waitGoneOrStopped(t *testing.T, id string) {
	t.Helper()
	if st, ok := k.pollStatus(t, id, 2*time.Minute, func(st string) bool { return st == "" || st == "STOPPED" }); !ok {
		t.Fatalf("task %s still %s", id, st)
	}
}

// background runs ctr in the background; the returned function waits for it and gives its exit code and
// stderr.
func (k *kilnEnv) background(t *testing.T, args ...string) func() (int, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	cmd := k.d.CtrCommand(ctx, args...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		cancel()
		t.Fatal(err)
	}
	var once sync.Once
	var code int
	wait := func() (int, string) {
		once.Do(func() {
			code = exitCode(cmd.Wait())
			cancel()
		})
		return code, stderr.String()
	}
	t.Cleanup(func() { wait() })
	return wait
}

// exitCodeRE finds the exit status in ctr's warning about a task that exited non-zero.
var exitCodeRE = regexp.MustCompile(`exit code (\d+)`)

// deleteTask deletes a stopped task and its container and returns the exit status ctr reported (-1 when it
// reported none).
func (k *kilnEnv) deleteTask(t *testing.T, id string) int {
	t.Helper()
	_, errOut, code := k.ctrCode(t, nil, "tasks", "delete", id)
	k.ctr(t, "containers", "delete", id)
	// ctr reports the task's exit status as its own exit code (containerd 2.2) or a warning (2.4).
	if m := exitCodeRE.FindStringSubmatch(errOut); m != nil {
		n, _ := strconv.Atoi(m[1])
		return n
	}
	if code > 1 {
		return code
	}
	if code == 0 {
		return 0
	}
	t.Errorf("ctr tasks delete %s: exit %d: %s", id, code, errOut)
	return -1
}

// watchedNet is a pod's network namespace with what it held before the pod used it.
type watchedNet struct {
	name, before string
}

// podNet gives a test's pod a network: a namespace CNI's bridge plugin configured (an interface, an address,
// routes), as for a CRI pod. Kiln adds a tap and qdiscs beside its interface for the VM; checkNothingLeft then
// compares the namespace's links, addresses, routes and qdiscs with what they were before the pod, so a tap or
// a qdisc the pod left fails the test. It returns the `ctr run` arguments that put a container there.
func (k *kilnEnv) podNet(t *testing.T) []string {
	t.Helper()
	k.netSeq++
	n := newCNINet(t, fmt.Sprintf("kiln-fault-%04d", k.netSeq), fmt.Sprintf("10.232.%d.0/24", k.netSeq%250))
	k.nets = append(k.nets, watchedNet{name: n.Name, before: netnsListing(t, n.Name)})
	// Registered after newCNINet's cleanup, so it runs before the namespace goes.
	t.Cleanup(func() {
		for i, w := range k.nets {
			if w.name == n.Name {
				k.nets = append(k.nets[:i], k.nets[i+1:]...)
				break
			}
		}
	})
	return []string{"--with-ns", "network:" + n.Path}
}

// checkNothingLeft fails the test for anything Kiln left on the host: shims, QEMU, virtiofsd or other
// processes naming the state directory, mounts, state, the VMs' host cgroups, and taps or qdiscs in the
// network namespaces of podNet.
func (k *kilnEnv) checkNothingLeft(t *testing.T, ids ...string) {
	t.Helper()
	state := k.d.StateDir()
	if err := StopSpare(k.d.Address, time.Minute); err != nil {
		t.Error(err)
	}
	if pids := k.d.WaitShimsGone(context.Background(), shimExitTimeout); len(pids) > 0 {
		t.Errorf("shims left:%s\nspare slots:%s", describe(pids), sparesSeen())
	}
	if pids := qemusIn(state); len(pids) > 0 {
		t.Errorf("QEMU left:%s\nspare slots:%s", describe(pids), sparesSeen())
	}
	if pids := ProcessesMatching(state); len(pids) > 0 {
		t.Errorf("processes naming %s left:%s\nspare slots:%s", state, describe(pids), sparesSeen())
	}
	if points, _ := MountsUnder(state); len(points) > 0 && !(len(points) == 1 && points[0] == state) {
		t.Errorf("mounts left under %s: %v", state, points)
	}
	if entries, err := os.ReadDir(state); err == nil {
		for _, e := range entries {
			t.Errorf("state left in %s: %s", state, e.Name())
		}
	}
	root := "/sys/fs/cgroup/memory"
	if _, err := os.Stat("/sys/fs/cgroup/cgroup.controllers"); err == nil {
		root = "/sys/fs/cgroup"
	}
	vms, _ := filepath.Glob(filepath.Join(root, Namespace, "*", "kiln-vm-*"))
	if len(vms) > 0 {
		t.Errorf("VM cgroups left: %v", vms)
	}
	for _, id := range ids {
		if _, err := os.Stat(filepath.Join(root, Namespace, id)); err == nil {
			t.Errorf("host cgroup of %s left", id)
		}
	}
	for _, n := range k.nets {
		if after := netnsListing(t, n.name); after != n.before {
			t.Errorf("network namespace %s after the pod (a tap or qdisc left?):\n%s\nbefore the pod:\n%s", n.name, after, n.before)
		}
	}
}

// logSize is the length of containerd's log (which holds the shims' logs): where a case's part begins.
func (k *kilnEnv) logSize() int64 {
	fi, err := os.Stat(k.d.LogPath)
	if err != nil {
		return 0
	}
	return fi.Size()
}

// logSince is containerd's log from offset on.
func (k *kilnEnv) logSince(t *testing.T, offset int64) string {
	t.Helper()
	b, err := os.ReadFile(k.d.LogPath)
	if err != nil {
		t.Fatal(err)
	}
	if offset > int64(len(b)) {
		offset = 0
	}
	return string(b[offset:])
}

// signalAll sends sig to each pid, failing the test when one is gone.
func signalAll(t *testing.T, sig syscall.Signal, pids ...int) {
	t.Helper()
	for _, pid := range pids {
		if err := syscall.Kill(pid, sig); err != nil {
			t.Fatalf("signal %v to %d: %v", sig, pid, err)
		}
	}
}

// shimRSS is a process's resident memory in KiB, from /proc/<pid>/status.
func shimRSS(t *testing.T, pid int) int {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			f := strings.Fields(v)
			if n, err := strconv.Atoi(f[0]); err == nil {
				return n
			}
		}
	}
	t.Fatalf("no VmRSS for %d", pid)
	return 0
}
