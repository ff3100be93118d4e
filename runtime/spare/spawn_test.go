package spare

import (
	"os"
	"strconv"
	"syscall"
	"testing"
	"time"
)

// Spawn fills the pool's free slots, one spare each, and leaves a held slot and its log to its holder; each spare
// holds its slot's lock itself (the spawner's is gone), so that a spawn meanwhile finds the pool full and starts
// nothing; a slot whose spare is gone is filled again, its failed spare's log started afresh.
func TestSpawnFillsThePool(t *testing.T) {
	dir := t.TempDir()
	held, err := claimHere(dir, "/c.sock", 0)
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	heldLog := socketPath(dir, "/c.sock", 0) + ".log"
	if err := os.WriteFile(heldLog, []byte("holder's line\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	// A spare that waits and prints its arguments, holding what it was handed.
	self := dir + "/spare.sh"
	if err := os.WriteFile(self, []byte("#!/bin/sh\necho \"$@\"\nexec sleep 30\n"), 0o700); err != nil {
		t.Fatal(err)
	}
	gate, err := spawn(dir, self, "/c.sock", 3, "/cfg", "-shape", "{}")
	if err != nil || gate == nil {
		t.Fatalf("spawn = %v, %v; want a gate", gate, err)
	}
	defer gate.Close()
	spares := holders(dir)
	t.Cleanup(func() {
		for _, pid := range spares {
			if pid != os.Getpid() {
				_ = syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	})
	if len(spares) != 3 || spares[socketPath(dir, "/c.sock", 0)] != os.Getpid() {
		t.Fatalf("slots after spawn = %v, want this process in slot 0 and two spares", spares)
	}
	for i := 1; i < 3; i++ {
		path := socketPath(dir, "/c.sock", i)
		pid := spares[path]
		if pid == 0 || pid == os.Getpid() {
			t.Fatalf("slot %d is held by %d, want a spare of its own", i, pid)
		}
		want := "spare -address /c.sock -slot " + strconv.Itoa(i) + " -config /cfg -shape {}\n"
		if b := waitLog(path+".log", want); b != want {
			t.Errorf("slot %d's log = %q, want %q", i, b, want)
		}
	}
	if b, _ := os.ReadFile(heldLog); string(b) != "holder's line\n" {
		t.Errorf("the held slot's log = %q, want its holder's line alone", b)
	}
	if again, err := spawn(dir, self, "/c.sock", 3, "/cfg"); again != nil || err != nil {
		t.Errorf("spawn into a full pool = %v, %v; want no gate and no error", again, err)
	}

	// Slot 2's spare dies (its log kept, as a failed spare's is): the next spawn fills that slot alone.
	failed := socketPath(dir, "/c.sock", 2)
	_ = syscall.Kill(spares[failed], syscall.SIGKILL)
	for deadline := time.Now().Add(5 * time.Second); len(all(dir)) != 2; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the killed spare still holds its slot: %+v", all(dir))
		}
	}
	next, err := spawn(dir, self, "/c.sock", 3, "/cfg")
	if err != nil || next == nil {
		t.Fatalf("spawn after a spare died = %v, %v", next, err)
	}
	defer next.Close()
	now := holders(dir)
	spares[failed] = now[failed]
	if len(now) != 3 || now[failed] == 0 || now[socketPath(dir, "/c.sock", 1)] != spares[socketPath(dir, "/c.sock", 1)] {
		t.Errorf("slots after the refill = %v, want slot 2 filled and the others as they were", now)
	}
	want := "spare -address /c.sock -slot 2 -config /cfg\n"
	if b := waitLog(failed+".log", want); b != want {
		t.Errorf("the refilled slot's log = %q, want its new spare's alone", b)
	}
}

// holders maps each held slot in dir to its spare's pid.
func holders(dir string) map[string]int {
	m := map[string]int{}
	for _, sp := range all(dir) {
		m[sp.Slot] = sp.Pid
	}
	return m
}

// waitLog reads the log at path until it is want, for up to 5 s, and returns what it read last.
func waitLog(path, want string) string {
	var b []byte
	for deadline := time.Now().Add(5 * time.Second); string(b) != want && time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		b, _ = os.ReadFile(path)
	}
	return string(b)
}
