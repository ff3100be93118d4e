package containerd

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// guestOOM: one container of a two-container pod exceeds its memory limit. TaskOOM comes for it and for no
// other, it exits 137, and its neighbour keeps running.
func guestOOM(t *testing.T, k *kilnEnv) {
	const pod = "f-oom"
	a, b := pod+"-a", pod+"-b"
	events := k.followEvents(t)
	net := k.podNet(t)
	k.runDetached(t, a, append(podArgs(pod), net...), sleeper...)
	k.waitStatus(t, a, "RUNNING")
	// 32 MiB limit; the shell's string doubles until the guest's OOM killer ends it.
	k.runDetached(t, b, append(append(podArgs(pod), net...), "--memory-limit", "33554432"), "sh", "-c", "x=xxxxxxxxxxxxxxxx; while true; do x=$x$x; done")
	events.waitFor(t, 2*time.Minute, "/tasks/exit", map[string]any{"container_id": b, "id": b, "exit_status": float64(137)})
	events.waitFor(t, time.Minute, "/tasks/oom", map[string]any{"container_id": b})
	if evs := events.find("/tasks/oom", map[string]any{"container_id": a}); len(evs) > 0 {
		t.Errorf("TaskOOM for %s, which stayed within its memory: %v", a, evs)
	}
	if st := k.taskStatus(t, a); st != "RUNNING" {
		t.Errorf("%s is %s after its neighbour's OOM, want RUNNING", a, st)
	}
	if st := k.deleteTask(t, b); st != 137 {
		t.Errorf("delete of %s reported exit status %d, want 137", b, st)
	}
	k.ctr(t, "tasks", "kill", "--signal", "SIGKILL", a)
	k.waitStatus(t, a, "STOPPED")
	k.deleteTask(t, a)
	events.stop()
	k.checkNothingLeft(t, a, b)
}

// containerdRestartMidExec: containerd restarts while an exec runs. The shim stays, containerd reconnects to
// it, and when the exec ends its exit (status 3) reaches the new containerd.
func containerdRestartMidExec(t *testing.T, k *kilnEnv) {
	const pod = "f-restart"
	a := pod + "-a"
	k.runDetached(t, a, podArgs(pod), sleeper...)
	k.waitStatus(t, a, "RUNNING")
	before := k.followEvents(t)
	k.ctr(t, "tasks", "exec", "--detach", "--exec-id", "mid", a, "sh", "-c", "while [ ! -e /go ]; do sleep 0.2; done; exit 3")
	before.waitFor(t, time.Minute, "/tasks/exec-started", map[string]any{"container_id": a, "exec_id": "mid"})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := k.d.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	k.waitStatus(t, a, "RUNNING")
	after := k.followEvents(t)
	k.ctr(t, "tasks", "exec", "--exec-id", "go", a, "touch", "/go")
	after.waitFor(t, time.Minute, "/tasks/exit", map[string]any{"container_id": a, "id": "mid", "exit_status": float64(3)})
	k.ctr(t, "tasks", "kill", "--signal", "SIGKILL", a)
	k.waitStatus(t, a, "STOPPED")
	if st := k.deleteTask(t, a); st != 137 {
		t.Errorf("delete of %s reported exit status %d, want 137", a, st)
	}
	before.stop()
	after.stop()
	k.checkNothingLeft(t, a)
}

// floodLimitMiB bounds what the flood test lets the guest write before calling it unbounded buffering;
// floodShimGrowthKiB bounds how much the shim may grow meanwhile.
const (
	floodLimitMiB      = 256
	floodShimGrowthKiB = 32 << 10
)

// stdoutFlood: a container writes to stdout without end while nothing reads it (`ctr run -d` leaves the fifo
// unread). The writer must come to a stop with little written, the shim's memory must stay bounded, and a kill
// still ends it.
func stdoutFlood(t *testing.T, k *kilnEnv) {
	const pod = "f-flood"
	a := pod + "-a"
	// The count is written aside and renamed into place: `echo $i > /count` truncates before it writes, and a
	// reader between the two would find an empty file (this test failed once that way).
	k.runDetached(t, a, podArgs(pod), "sh", "-c",
		"while [ ! -e /go ]; do sleep 0.2; done; i=0; while true; do head -c 65536 /dev/zero; i=$((i+1)); echo $i > /count.new; mv /count.new /count; done")
	k.waitStatus(t, a, "RUNNING")
	shims := k.shimProcesses()
	if len(shims) != 1 {
		t.Fatalf("want one shim, found %v", shims)
	}
	rssBefore := shimRSS(t, shims[0])
	k.ctr(t, "tasks", "exec", "--exec-id", "go", a, "touch", "/go")
	// The writer (counting 64 KiB pieces) stops once every buffer between it and the unread fifo is full: it
	// has written nothing more for five readings in a row. Without a bound it would pass floodLimitMiB first.
	written, same := -1, 0
	for i := 0; same < 5; i++ {
		out, errOut, code := k.ctrCode(t, nil, "tasks", "exec", "--exec-id", "count"+strconv.Itoa(i), a, "sh", "-c", "cat /count 2>/dev/null || echo 0")
		n, err := strconv.Atoi(strings.TrimSpace(out))
		if err != nil {
			t.Fatalf("reading the writer's count: %q (ctr exit %d: %s)", out, code, errOut)
		}
		if n*64 > floodLimitMiB<<10 {
			t.Fatalf("the guest wrote %d KiB to a stdout nobody reads: something buffers it without bound (shim RSS %d KiB, was %d)",
				n*64, shimRSS(t, shims[0]), rssBefore)
		}
		if n == written {
			same++
		} else {
			written, same = n, 0
		}
		time.Sleep(time.Second)
	}
	rssAfter := shimRSS(t, shims[0])
	if written < 1 {
		t.Fatalf("the writer wrote nothing: it never started")
	}
	t.Logf("the writer stopped after %d KiB; shim RSS %d KiB before, %d KiB after", written*64, rssBefore, rssAfter)
	if rssAfter-rssBefore > floodShimGrowthKiB {
		t.Errorf("the shim grew by %d KiB while its stdout was flooded, more than %d", rssAfter-rssBefore, floodShimGrowthKiB)
	}
	k.ctr(t, "tasks", "kill", "--signal", "SIGKILL", a)
	// The exit waits for the output to drain, which it never does here: the agent gives up after 10 s, the shim
	// after its drain timeout (30 s).
	k.waitStatusWithin(t, a, "STOPPED", 2*time.Minute)
	k.deleteTask(t, a)
	k.checkNothingLeft(t, a)
}

// stateDirFull: Kiln's state directory is a 1 MiB tmpfs. A pod runs while it fills up: the pod goes on (exec,
// kill, delete). A pod that starts while it is full fails with an error that names the cause, and leaves
// nothing.
func stateDirFull(t *testing.T, k *kilnEnv) {
	state := k.d.StateDir()
	if err := os.MkdirAll(state, 0o711); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("kiln-full", state, "tmpfs", 0, "size=1m,mode=0711"); err != nil {
		t.Fatalf("mount a 1 MiB tmpfs on %s: %v", state, err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(state, unix.MNT_DETACH); err != nil {
			t.Errorf("unmount %s: %v", state, err)
		}
	})
	const pod, other = "f-full", "f-full2"
	a := pod + "-a"
	k.runDetached(t, a, podArgs(pod), sleeper...)
	k.waitStatus(t, a, "RUNNING")
	fill := filepath.Join(state, "fill")
	if err := fillUp(fill); err != nil {
		t.Fatal(err)
	}
	if out := k.ctr(t, "tasks", "exec", "--exec-id", "e", a, "echo", "still-here"); strings.TrimSpace(out) != "still-here" {
		t.Errorf("exec with the state directory full printed %q", out)
	}
	args := append(append([]string{"run", "--rm"}, KilnRunArgs(k.cfg)...), podArgs(other)...)
	_, errOut, code := k.ctrCode(t, nil, append(args, BusyboxRef, other+"-a", "true")...)
	t.Logf("ctr run with the state directory full: exit %d, stderr %q", code, strings.TrimSpace(errOut))
	if code == 0 || !strings.Contains(errOut, "no space left on device") {
		t.Errorf("a pod started with its state directory full: exit %d, stderr %q; want an error naming ENOSPC", code, errOut)
	}
	_, _, _ = k.ctrCode(t, nil, "containers", "delete", other+"-a")
	k.ctr(t, "tasks", "kill", "--signal", "SIGKILL", a)
	k.waitStatus(t, a, "STOPPED")
	k.deleteTask(t, a)
	if err := os.Remove(fill); err != nil {
		t.Fatal(err)
	}
	k.checkNothingLeft(t, a, other+"-a")
}

// fillUp writes path until its file system has no space left.
func fillUp(path string) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	defer f.Close()
	buf := make([]byte, 64<<10)
	for {
		if _, err := f.Write(buf); err != nil {
			if errors.Is(err, syscall.ENOSPC) {
				return nil
			}
			return fmt.Errorf("fill %s: %w", path, err)
		}
	}
}
