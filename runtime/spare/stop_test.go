package spare

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// The spares of these tests: scripts that wait, holding what they were handed. The shell waits (rather than exec
// sleep) so that its command line keeps the spare's arguments, which Stop looks for; sleep gets neither the gate
// nor the lock.
const (
	// stopsOnTerm ends on SIGTERM, giving its slot up.
	stopsOnTerm = "sleep 30 3>&- 4>&- &\nwait\n"
	// staysOn ignores SIGTERM.
	staysOn = "trap '' TERM\nsleep 30 3>&- 4>&- &\nwait\n"
	// takesTask gives its slot up on SIGTERM and runs on, as a spare handed a task as it is told to stop does.
	takesTask = "trap 'exec 4>&-' TERM\nsleep 30 3>&- 4>&- &\nwait\nwait\n"
)

// spareScript writes a spare for spawn that runs body.
func spareScript(t *testing.T, body string) string {
	t.Helper()
	self := t.TempDir() + "/spare.sh"
	if err := os.WriteFile(self, []byte("#!/bin/sh\n"+body), 0o700); err != nil {
		t.Fatal(err)
	}
	return self
}

// spawnHere fills pool slots of address with spares of self, failing the test when none starts.
func spawnHere(t *testing.T, dir, self, address string, pool int) {
	t.Helper()
	gate, err := spawn(dir, self, address, pool, "/cfg")
	if err != nil || gate == nil {
		t.Fatalf("spawn for %s = %v, %v", address, gate, err)
	}
	var groups []int
	for _, sp := range all(dir) {
		if sp.Address == address {
			groups = append(groups, sp.Pid)
		}
	}
	// Each spare leads a session of its own (Spawn): its group holds the script's sleep too.
	t.Cleanup(func() {
		_ = gate.Close()
		for _, pid := range groups {
			_ = syscall.Kill(-pid, syscall.SIGKILL)
		}
	})
}

func alive(pid int) bool { return syscall.Kill(pid, 0) == nil }

// Stop stops the selected spares in slots and waits for them to be gone, also for a spare whose spawner names it
// only after Stop began; it leaves other containerds' spares, and a process whose command line reads "spare" but
// that holds no slot (a spare that took a task). Purge removes a failed spare's slot and a dead spare's place in
// the turns' queue but keeps a live spare's files, and the directory once no spare holds a slot.
func TestStopStopsSparesInSlots(t *testing.T) {
	dir := t.TempDir()
	self := spareScript(t, stopsOnTerm)
	spawnHere(t, dir, self, "/a.sock", 2)
	spawnHere(t, dir, self, "/b.sock", 1)
	taken := exec.Command(self, SpareArg, "-address", "/a.sock")
	if err := taken.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = taken.Process.Kill(); _ = taken.Wait() })
	var b Info
	for _, sp := range all(dir) {
		if sp.Address == "/b.sock" {
			b = sp
		}
	}
	// Slot 2 of /a.sock is being filled: claimed, its spare not named yet.
	starting, err := claim(dir, "/a.sock", 2)
	if err != nil {
		t.Fatal(err)
	}
	type result struct {
		stopped []Info
		err     error
	}
	done := make(chan result, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		stopped, err := stop(ctx, dir, func(sp Info) bool { return sp.Address == "/a.sock" }, isSpareShim)
		done <- result{stopped, err}
	}()
	select {
	case r := <-done:
		t.Fatalf("Stop returned while a slot was being filled: %+v, %v", r.stopped, r.err)
	case <-time.After(300 * time.Millisecond):
	}
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer w.Close()
	if err := starting.start(self, r, []string{SpareArg, "-address", "/a.sock", "-slot", "2"}); err != nil {
		t.Fatal(err)
	}
	var res result
	select {
	case res = <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Stop did not return")
	}
	if res.err != nil || len(res.stopped) != 3 {
		t.Fatalf("Stop = %+v, %v; want /a.sock's three spares", res.stopped, res.err)
	}
	for _, sp := range res.stopped {
		if sp.Address != "/a.sock" || alive(sp.Pid) {
			t.Errorf("stopped %+v: alive %v", sp, alive(sp.Pid))
		}
	}
	if !alive(b.Pid) || !alive(taken.Process.Pid) {
		t.Errorf("Stop of /a.sock's spares stopped /b.sock's (%v) or a spare that took a task (%v)", !alive(b.Pid), !alive(taken.Process.Pid))
	}
	// A spare of /c.sock that failed (killed, its log kept) and a place in the turns' queue whose spare is gone.
	spawnHere(t, dir, self, "/c.sock", 1)
	failed := socketPath(dir, "/c.sock", 0)
	for _, sp := range all(dir) {
		if sp.Address == "/c.sock" {
			_ = syscall.Kill(sp.Pid, syscall.SIGKILL)
		}
	}
	for deadline := time.Now().Add(5 * time.Second); len(all(dir)) != 1; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the killed spare still holds its slot: %+v", all(dir))
		}
	}
	place := dir + "/" + waitPrefix + "00000000000000000001-dead" + waitSuffix
	// A lost spare's log without its lock, and a socket a spare whose slot went left.
	orphans := []string{dir + "/0123456789abcdef.sock.log", dir + "/0123456789abcdef-3.sock"}
	for _, f := range append([]string{place}, orphans...) {
		if err := os.WriteFile(f, []byte("1\n"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if err := purge(dir); err == nil || !strings.Contains(err.Error(), strconv.Itoa(b.Pid)) {
		t.Errorf("Purge with /b.sock's spare in its slot = %v, want an error naming it", err)
	}
	for _, f := range []string{b.Slot + ".lock", b.Slot + ".log"} {
		if _, err := os.Stat(f); err != nil {
			t.Errorf("Purge removed %s of a live spare: %v", f, err)
		}
	}
	for _, f := range append([]string{failed + ".lock", failed + ".log", place}, orphans...) {
		if _, err := os.Stat(f); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("Purge left %s (%v)", f, err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if stopped, err := stop(ctx, dir, nil, isSpareShim); err != nil || len(stopped) != 1 || stopped[0].Pid != b.Pid {
		t.Fatalf("Stop of every spare = %+v, %v; want /b.sock's", stopped, err)
	}
	if err := purge(dir); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("Purge left %s (%v)", dir, err)
	}
}

// A spare that does not stop on SIGTERM is killed once Stop's context ends, and named in its error; one that gave
// its slot up but runs on (it took a task) is named and left running.
func TestStopKillsASpareThatStaysOn(t *testing.T) {
	for _, c := range []struct {
		name, body string
		killed     bool
		says       string
	}{
		{"ignores SIGTERM", staysOn, true, "did not stop on SIGTERM (killed)"},
		{"took a task", takesTask, false, "gave their slots up but still run"},
	} {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			spawnHere(t, dir, spareScript(t, c.body), "/a.sock", 1)
			pid := all(dir)[0].Pid
			// The script has set its trap once it has started sleep.
			for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
				if b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", pid, pid)); strings.TrimSpace(string(b)) != "" {
					break
				}
				if time.Now().After(deadline) {
					t.Fatal("the spare never ran sleep")
				}
			}
			ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
			defer cancel()
			_, err := stop(ctx, dir, nil, isSpareShim)
			if err == nil || !strings.Contains(err.Error(), c.says) || !strings.Contains(err.Error(), strconv.Itoa(pid)) || !errors.Is(err, context.DeadlineExceeded) {
				t.Fatalf("Stop = %v, want an error naming %d: %s", err, pid, c.says)
			}
			for deadline := time.Now().Add(5 * time.Second); alive(pid) == c.killed; time.Sleep(10 * time.Millisecond) {
				if time.Now().After(deadline) {
					t.Fatalf("the spare alive %v, want killed %v", alive(pid), c.killed)
				}
			}
			if !c.killed {
				time.Sleep(100 * time.Millisecond)
				if !alive(pid) {
					t.Error("Stop killed a spare that had given its slot up (a task's shim)")
				}
			}
		})
	}
}

// A slot held under a pid that is no spare shim (its spare is exiting: the kernel drops a process's command line
// before its files) is waited for until it is free, and the process it names is never signalled, in case the
// kernel gave that pid to another process; one that stays held is named in Stop's error when ctx ends.
func TestStopWaitsForSlotsOfExitingSpares(t *testing.T) {
	for _, c := range []struct {
		name    string
		release time.Duration // when the slot is given up; 0: never
	}{
		{"given up", 300 * time.Millisecond},
		{"stays held", 0},
	} {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			other := exec.Command("sleep", "30")
			if err := other.Start(); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = other.Process.Kill(); _ = other.Wait() })
			slot, err := claim(dir, "/a.sock", 0)
			if err != nil {
				t.Fatal(err)
			}
			slot.name(other.Process.Pid)
			released := make(chan struct{})
			if c.release > 0 {
				time.AfterFunc(c.release, func() { slot.Close(); close(released) })
				defer func() { <-released }()
			} else {
				defer slot.Close()
			}
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			defer cancel()
			start := time.Now()
			stopped, err := stop(ctx, dir, nil, isSpareShim)
			if len(stopped) != 0 {
				t.Errorf("Stop stopped %+v", stopped)
			}
			if c.release > 0 {
				if err != nil || time.Since(start) < c.release {
					t.Errorf("Stop = %v after %s; want nil once the slot was given up after %s", err, time.Since(start), c.release)
				}
			} else if err == nil || !strings.Contains(err.Error(), slot.path) || !errors.Is(err, context.DeadlineExceeded) {
				t.Errorf("Stop = %v; want an error naming the slot held by a process that is no spare shim", err)
			}
			time.Sleep(100 * time.Millisecond)
			if !alive(other.Process.Pid) {
				t.Error("Stop signalled a process that is no spare shim")
			}
		})
	}
}
