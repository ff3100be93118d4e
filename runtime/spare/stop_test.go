package spare

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// spareScript writes a spare for spawn that waits, holding what it was handed; ignoreTerm makes it one that does
// not stop on SIGTERM.
func spareScript(t *testing.T, ignoreTerm bool) string {
	t.Helper()
	body := "#!/bin/sh\nexec sleep 30\n"
	if ignoreTerm {
		body = "#!/bin/sh\ntrap '' TERM\nexec sleep 30\n"
	}
	self := t.TempDir() + "/spare.sh"
	if err := os.WriteFile(self, []byte(body), 0o700); err != nil {
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
	t.Cleanup(func() {
		_ = gate.Close()
		for _, sp := range all(dir) {
			_ = syscall.Kill(sp.Pid, syscall.SIGKILL)
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
	self := spareScript(t, false)
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
		stopped, err := stop(ctx, dir, func(sp Info) bool { return sp.Address == "/a.sock" })
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
	if err := os.WriteFile(place, []byte("1\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := purge(dir); err == nil || !strings.Contains(err.Error(), strconv.Itoa(b.Pid)) {
		t.Errorf("Purge with /b.sock's spare in its slot = %v, want an error naming it", err)
	}
	for _, f := range []string{b.Slot + ".lock", b.Slot + ".log"} {
		if _, err := os.Stat(f); err != nil {
			t.Errorf("Purge removed %s of a live spare: %v", f, err)
		}
	}
	for _, f := range []string{failed + ".lock", failed + ".log", place} {
		if _, err := os.Stat(f); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("Purge left %s (%v)", f, err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if stopped, err := stop(ctx, dir, nil); err != nil || len(stopped) != 1 || stopped[0].Pid != b.Pid {
		t.Fatalf("Stop of every spare = %+v, %v; want /b.sock's", stopped, err)
	}
	if err := purge(dir); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("Purge left %s (%v)", dir, err)
	}
}

// A spare that does not stop on SIGTERM is killed once Stop's context ends, and named in its error.
func TestStopKillsASpareThatStaysOn(t *testing.T) {
	dir := t.TempDir()
	spawnHere(t, dir, spareScript(t, true), "/a.sock", 1)
	pid := all(dir)[0].Pid
	// The script has set its trap once it runs sleep.
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if b, _ := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/comm"); strings.TrimSpace(string(b)) == "sleep" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the spare never ran sleep")
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	_, err := stop(ctx, dir, nil)
	if err == nil || !strings.Contains(err.Error(), strconv.Itoa(pid)) || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Stop of a spare that ignores SIGTERM = %v, want an error naming %d", err, pid)
	}
	for deadline := time.Now().Add(5 * time.Second); alive(pid); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the spare that stayed on was not killed")
		}
	}
}
