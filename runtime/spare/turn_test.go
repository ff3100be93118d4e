package spare

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestTurns(t *testing.T) {
	for _, tc := range []struct{ cpus, vcpus, turns, turnCPUs int }{
		{cpus: 2, vcpus: 2, turns: 1, turnCPUs: 2},
		{cpus: 1, vcpus: 2, turns: 1, turnCPUs: 1},
		{cpus: 3, vcpus: 2, turns: 1, turnCPUs: 2},
		{cpus: 64, vcpus: 2, turns: 32, turnCPUs: 2},
		{cpus: 8, vcpus: 1, turns: 8, turnCPUs: 1},
		{cpus: 8, vcpus: 0, turns: 8, turnCPUs: 1},
		{cpus: 4, vcpus: 16, turns: 1, turnCPUs: 4},
	} {
		if got := TurnCPUs(tc.cpus, tc.vcpus); got != tc.turnCPUs || tc.cpus/got != tc.turns {
			t.Errorf("TurnCPUs(%d, %d) = %d, want %d (%d spares at once)", tc.cpus, tc.vcpus, got, tc.turnCPUs, tc.turns)
		}
	}
}

// waitBriefly waits for a turn of need of the host's cpus for at most d.
func waitBriefly(t *testing.T, dir string, cpus, need int, d time.Duration) (*Turn, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(testCtx(t), d)
	defer cancel()
	return waitTurn(ctx, dir, cpus, need)
}

func TestTurnsBoundTheSparesBootingAtOnce(t *testing.T) {
	for _, tc := range []struct{ cpus, vcpus int }{{2, 2}, {2, 1}, {3, 2}} {
		turns := tc.cpus / TurnCPUs(tc.cpus, tc.vcpus)
		dir := t.TempDir()
		var held []*Turn
		for i := range turns {
			tr, err := waitBriefly(t, dir, tc.cpus, tc.vcpus, time.Second)
			if err != nil {
				t.Fatalf("%d turns: turn %d: %v", turns, i, err)
			}
			held = append(held, tr)
		}
		if _, err := waitBriefly(t, dir, tc.cpus, tc.vcpus, 3*turnPoll); !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("%d turns, all held: got %v, want the wait to end with its context", turns, err)
		}
		// A waiting spare takes the turn the first one gives back.
		got := make(chan error, 1)
		go func() {
			tr, err := waitBriefly(t, dir, tc.cpus, tc.vcpus, 10*time.Second)
			if err == nil {
				tr.Release()
			}
			got <- err
		}()
		time.Sleep(2 * turnPoll)
		held[0].Release()
		held[0].Release() // idempotent
		if err := <-got; err != nil {
			t.Fatalf("%d turns: a waiting spare did not get the turn given back: %v", turns, err)
		}
		for _, tr := range held[1:] {
			tr.Release()
		}
		if left, _ := filepath.Glob(filepath.Join(dir, "*")); len(left) != 0 {
			t.Fatalf("%d turns: released turns left %v", turns, left)
		}
	}
}

// Spares of different sizes share the CPUs by their vCPUs, in the order they began to wait: one that needs more
// CPUs than are free takes none while it waits, and a smaller spare that came after it waits behind it.
func TestTurnsShareCPUsBySize(t *testing.T) {
	dir := t.TempDir()
	take := func(need int) *Turn {
		t.Helper()
		tr, err := waitBriefly(t, dir, 4, need, time.Second)
		if err != nil {
			t.Fatalf("a turn of %d CPUs: %v", need, err)
		}
		return tr
	}
	waitFor := func(need int) <-chan *Turn { return queue(t, dir, 4, need) }
	stillWaits := func(got <-chan *Turn, what string) {
		t.Helper()
		select {
		case tr := <-got:
			t.Fatalf("%s got a turn of %d CPUs, want it to wait", what, len(tr.cpus))
		case <-time.After(3 * turnPoll):
		}
	}
	two, one := take(2), take(1)
	big := waitFor(2)
	// The 2-CPU spare holds none of the CPUs while it waits: the free one is still free (tryTurn skips the queue;
	// it is tried again because the waiting spare's own tries hold the CPU for a moment).
	var probe *Turn
	var err error
	for range 20 {
		if probe, err = tryTurn(dir, 4, 1); probe != nil || err != nil {
			break
		}
		time.Sleep(turnPoll / 5)
	}
	if err != nil || probe == nil {
		t.Fatalf("the free CPU beside a waiting 2-CPU spare: %v, %v", probe, err)
	}
	probe.Release()
	small := waitFor(1)
	stillWaits(small, "a 1-CPU spare queued behind a waiting 2-CPU spare")
	one.Release()
	var b *Turn
	select {
	case b = <-big:
	case <-time.After(5 * time.Second):
	}
	if b == nil || len(b.cpus) != 2 {
		t.Fatalf("a turn of 2 CPUs once two were free: %+v", b)
	}
	stillWaits(small, "a 1-CPU spare with no CPU free")
	two.Release()
	s := <-small
	if s == nil || len(s.cpus) != 1 {
		t.Fatalf("a turn of 1 CPU once two were free: %+v", s)
	}
	all := waitFor(4)
	b.Release()
	stillWaits(all, "a 4-CPU spare with 3 CPUs free")
	s.Release()
	if a := <-all; a == nil || len(a.cpus) != 4 {
		t.Fatalf("a turn of all 4 CPUs once they were free: %+v", a)
	} else {
		a.Release()
	}
	if left, _ := filepath.Glob(filepath.Join(dir, "*")); len(left) != 0 {
		t.Fatalf("released turns left %v", left)
	}
}

// queue starts a spare that waits for a turn of need of cpus CPUs, and returns once it holds its place in dir's
// queue (or has its turn). The turn, or nil if the wait failed, comes on the channel.
func queue(t *testing.T, dir string, cpus, need int) <-chan *Turn {
	t.Helper()
	before := len(places(dir))
	got := make(chan *Turn, 1)
	go func() {
		tr, _ := waitBriefly(t, dir, cpus, need, 10*time.Second)
		got <- tr
	}()
	for deadline := time.Now().Add(5 * time.Second); len(places(dir)) == before; {
		if time.Now().After(deadline) {
			t.Fatalf("a spare waiting for %d CPUs did not join the queue", need)
		}
		time.Sleep(time.Millisecond)
	}
	return got
}

// Spares of one size get their turns in the order they began to wait.
func TestQueueOrder(t *testing.T) {
	dir := t.TempDir()
	booting, err := waitBriefly(t, dir, 1, 1, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	var waiting []<-chan *Turn
	for range 3 {
		waiting = append(waiting, queue(t, dir, 1, 1))
	}
	for i, got := range waiting {
		booting.Release()
		select {
		case booting = <-got:
		case <-time.After(5 * time.Second):
			t.Fatalf("spare %d of the queue did not get the turn given back", i)
		}
		if booting == nil {
			t.Fatalf("spare %d of the queue: its wait failed", i)
		}
		for j, later := range waiting[i+1:] {
			select {
			case tr := <-later:
				tr.Release()
				t.Fatalf("spare %d of the queue got the turn with spare %d", i+1+j, i)
			default:
			}
		}
	}
	booting.Release()
	if left, _ := filepath.Glob(filepath.Join(dir, "*")); len(left) != 0 {
		t.Fatalf("the queue left %v", left)
	}
}

// A waiting spare stamps its place at every look; a place its spare has not stamped for queueStale (the spare is
// stopped) is passed over, though its lock is held.
func TestQueuePassesAStoppedSpare(t *testing.T) {
	dir := t.TempDir()
	booting, err := waitBriefly(t, dir, 2, 1, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	// A live 2-CPU spare waits with one CPU free; its place made to look old is stamped again at its next look, and
	// a 1-CPU spare behind it still waits.
	big := queue(t, dir, 2, 2)
	inQueue := places(dir)
	if len(inQueue) != 1 {
		t.Fatalf("places in the queue: %v", inQueue)
	}
	old := time.Now().Add(-queueStale - time.Second)
	if err := os.Chtimes(inQueue[0], old, old); err != nil {
		t.Fatal(err)
	}
	time.Sleep(2 * turnPoll)
	if _, err := waitBriefly(t, dir, 2, 1, 3*turnPoll); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("a turn behind a live waiting spare: got %v, want the wait to end with its context", err)
	}
	booting.Release()
	if tr := <-big; tr == nil {
		t.Fatal("the 2-CPU spare's wait failed")
	} else {
		tr.Release()
	}
	// A place whose spare stopped keeps its lock and its old stamp.
	stopped, err := join(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer stopped.leave()
	if _, err := waitBriefly(t, dir, 1, 1, 3*turnPoll); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("a turn with a live spare waiting before: got %v, want the wait to end with its context", err)
	}
	if err := os.Chtimes(stopped.path, old, old); err != nil {
		t.Fatal(err)
	}
	tr, err := waitBriefly(t, dir, 1, 1, time.Second)
	if err != nil {
		t.Fatalf("a turn behind a stopped spare: %v", err)
	}
	tr.Release()
	if _, err := os.Stat(stopped.path); err != nil {
		t.Fatalf("the stopped spare's place, still locked: %v", err)
	}
}

// A place found unlocked is removed as a dead spare's, even when its spare has made it and not locked it yet: that
// spare's lock then fails, and join makes it another place.
func TestPlaceTakenBeforeItsLock(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, waitPrefix+"00000000000000000001-00000000"+waitSuffix)
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	if waiting(path, time.Now()) {
		t.Fatal("an unlocked place counts as a waiting spare")
	}
	if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the unlocked place after a look: %v", err)
	}
	if l, err := lockOpen(f, path); l != nil || !errors.Is(err, errTaken) {
		t.Fatalf("lock of a place removed before it: got %v, %v, want errTaken", l, err)
	}
	w, err := join(dir)
	if err != nil {
		t.Fatal(err)
	}
	if !waiting(w.path, time.Now()) {
		t.Fatal("a joined spare's place does not count as waiting")
	}
	w.leave()
	if left, _ := filepath.Glob(filepath.Join(dir, "*")); len(left) != 0 {
		t.Fatalf("the queue left %v", left)
	}
}

// A spare waits behind one that began to wait before it, and passes it once that one is killed: the next spare
// that looks removes the dead one's place.
func TestQueueOfAKilledSpare(t *testing.T) {
	dir := t.TempDir()
	ahead, err := join(dir)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := waitBriefly(t, dir, 1, 1, 3*turnPoll); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("a turn with a live spare waiting before: got %v, want the wait to end with its context", err)
	}
	_ = ahead.f.Close() // the kernel unlocks a dead process's files; its place stays
	tr, err := waitBriefly(t, dir, 1, 1, time.Second)
	if err != nil {
		t.Fatalf("a turn behind a killed spare: %v", err)
	}
	tr.Release()
	if _, err := os.Stat(ahead.path); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the killed spare's place after the next spare's turn: %v", err)
	}
	if left, _ := filepath.Glob(filepath.Join(dir, "*")); len(left) != 0 {
		t.Fatalf("the queue left %v", left)
	}
}

// A spare killed while it boots leaves its turn's file, unlocked: the next spare takes that turn and removes it.
func TestTurnOfAKilledSpare(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "boot-0.lock")
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX); err != nil {
		t.Fatal(err)
	}
	if _, err := waitBriefly(t, dir, 1, 1, 3*turnPoll); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("turn held by a live spare: got %v, want the wait to end with its context", err)
	}
	f.Close() // the kernel unlocks a dead process's files
	tr, err := waitBriefly(t, dir, 1, 1, time.Second)
	if err != nil {
		t.Fatalf("turn of a killed spare: %v", err)
	}
	tr.Release()
	if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the killed spare's turn file after the next release: %v", err)
	}
}

// A lock taken on a turn's file that its holder removed meanwhile is no turn: the file now at the path is another.
func TestTurnOnARemovedFile(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "boot-0.lock")
	first, err := tryTurn(dir, 1, 1)
	if err != nil || first == nil {
		t.Fatalf("first turn: %v, %v", first, err)
	}
	// A second spare opened the file before the first released it, and locks it after.
	stale, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	first.Release()
	if f, err := lockOpen(stale, path); f != nil || !errors.Is(err, errTaken) {
		t.Fatalf("lock of a removed turn file: got %v, %v, want no turn", f, err)
	}
	// The next try makes a new file at the path. A spare that opened the old one before it was removed, and locks
	// it only now, finds another file there: no turn either, and its release would not remove the new holder's.
	next, err := tryTurn(dir, 1, 1)
	if err != nil || next == nil {
		t.Fatalf("turn after the release: %v, %v", next, err)
	}
	stale, err = os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	next.Release()
	again, err := tryTurn(dir, 1, 1)
	if err != nil || again == nil {
		t.Fatalf("turn after the second release: %v, %v", again, err)
	}
	if f, err := lockOpen(stale, path); f != nil || !errors.Is(err, errTaken) {
		t.Fatalf("lock of a turn file recreated since: got %v, %v, want no turn", f, err)
	}
	again.Release()
}

// A turn whose file was removed and made again by another spare (Dir removed meanwhile) leaves that file to it.
func TestReleaseLeavesAnotherHoldersFile(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "boot-0.lock")
	first, err := tryTurn(dir, 1, 1)
	if err != nil || first == nil {
		t.Fatalf("first turn: %v, %v", first, err)
	}
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	second, err := tryTurn(dir, 1, 1)
	if err != nil || second == nil {
		t.Fatalf("turn on the file made again: %v, %v", second, err)
	}
	first.Release()
	if _, err := os.Stat(path); err != nil {
		t.Fatalf("the first turn's release removed the second's file: %v", err)
	}
	second.Release()
	if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the second turn's file after its release: %v", err)
	}
}

func TestWaitTurnWithoutItsDirectory(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "missing", "spare")
	tr, err := waitBriefly(t, dir, 1, 1, time.Second)
	if err != nil {
		t.Fatalf("wait for a turn in a directory not made yet: %v", err)
	}
	tr.Release()
}

// scan tells which held slots' spares wait in the queue for a turn, and where: dead spares' places do not count.
func TestScanShowsQueuedSpares(t *testing.T) {
	dir := t.TempDir()
	slot, err := claimHere(dir, "/c.sock", 0)
	if err != nil {
		t.Fatal(err)
	}
	defer slot.Close()
	if held, _ := scan(dir); len(held) != 1 || held[0].Queued != 0 {
		t.Fatalf("scan of a slot whose spare is not queued = %+v", held)
	}
	// A dead spare's place (unlocked), then this spare's.
	dead := filepath.Join(dir, waitPrefix+"00000000000000000001-00000000"+waitSuffix)
	if err := os.WriteFile(dead, []byte("1\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	w, err := join(dir)
	if err != nil {
		t.Fatal(err)
	}
	if held, _ := scan(dir); len(held) != 1 || held[0].Queued != 1 {
		t.Fatalf("scan of a slot whose spare is first in the queue = %+v", held)
	}
	if got := queued(dir); len(got) != 1 || got[os.Getpid()] != 1 {
		t.Fatalf("queued = %v, want this process first", got)
	}
	w.leave()
	if held, _ := scan(dir); len(held) != 1 || held[0].Queued != 0 {
		t.Fatalf("scan after the spare left the queue = %+v", held)
	}
}
