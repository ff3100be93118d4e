package spare

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"time"

	"golang.org/x/sys/unix"
)

// The queue for turns: a waiting spare's place is a file wait-<time>-<tag>.lock in the turns' directory, locked
// by the spare while it waits and removed when it leaves. Names sort by the time their spares began to wait (the
// monotonic clock, which the host's processes share as long as they run in one time namespace, as containerd's
// shims do; the random tag orders two of one nanosecond), so a spare looks for a turn only when no live spare
// waits before it. The kernel gives up a dead spare's lock; the next spare that finds its file unlocked removes
// it. A waiting spare stamps its place's modification time at every look, and a place not stamped for
// queueStale is passed over though locked: its spare is stopped (SIGSTOP, a frozen cgroup) or starved, and
// would otherwise hold up every spare behind it.

const (
	waitPrefix = "wait-"
	waitSuffix = ".lock"
	// joinAttempts bounds how often join makes a new place when its file was taken for a dead spare's before it
	// could lock it (see join).
	joinAttempts = 8
	// queueStale is how long a place may go without its spare's stamp before the spares behind it pass it: a
	// waiting spare stamps it every turnPoll.
	queueStale = 10 * time.Second
)

// waiter is one spare's place in the queue.
type waiter struct {
	f    *os.File
	path string
}

// join gives the caller a place in dir's queue, behind every spare whose place was made before it read the clock
// (one that read it earlier and makes its file a moment later sorts before it).
func join(dir string) (*waiter, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("spare shim directory: %w", err)
	}
	for range joinAttempts {
		var now unix.Timespec
		if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &now); err != nil {
			return nil, fmt.Errorf("queue for a boot turn: read the clock: %w", err)
		}
		tag := make([]byte, 4)
		_, _ = rand.Read(tag)
		path := filepath.Join(dir, fmt.Sprintf("%s%020d-%s%s", waitPrefix, now.Nano(), hex.EncodeToString(tag), waitSuffix))
		// Between the file's creation and its lock, a spare looking at the queue finds it unlocked and removes it
		// as a dead spare's: lockFile then answers errTaken, and the caller takes a new place.
		f, err := lockFile(path)
		if errors.Is(err, errTaken) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("queue for a boot turn: %w", err)
		}
		// The place names its spare, for `kiln check` (queued).
		_, _ = f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
		return &waiter{f: f, path: path}, nil
	}
	return nil, fmt.Errorf("queue for a boot turn in %s: every place made was taken before it could be locked", dir)
}

// places lists the places in dir's queue, first first (names sort by the time their spares joined).
func places(dir string) []string {
	names, _ := filepath.Glob(filepath.Join(dir, waitPrefix+"*"+waitSuffix))
	slices.Sort(names)
	return names
}

// first says whether no live spare waits before w. It stamps w's place and removes the places of dead spares it
// passes.
func (w *waiter) first() bool {
	now := time.Now()
	_ = os.Chtimes(w.path, now, now)
	for _, p := range places(filepath.Dir(w.path)) {
		if p >= w.path {
			break
		}
		if waiting(p, now) {
			return false
		}
	}
	return true
}

// waiting says whether a live spare waits in the place at path, stamped within queueStale of now. A place whose
// lock can be taken is a dead spare's, or one whose spare is leaving or has yet to lock it (see join): it is
// removed (while it is still the file locked), and does not count.
func waiting(path string, now time.Time) bool {
	f, err := os.Open(path)
	if err != nil {
		return false // gone: its spare left
	}
	defer f.Close()
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		// EWOULDBLOCK: its spare holds it. A lock that fails otherwise is passed over: a queue that stopped at it
		// would stop every spare behind it for good.
		if !errors.Is(err, unix.EWOULDBLOCK) {
			return false
		}
		st, err := f.Stat()
		return err == nil && now.Sub(st.ModTime()) < queueStale
	}
	if isFile(int(f.Fd()), path) == nil {
		_ = os.Remove(path)
	}
	return false
}

// leave gives up w's place. It is nil-safe.
func (w *waiter) leave() {
	if w == nil || w.f == nil {
		return
	}
	// make uninstall may have removed the directory meanwhile; only w's own file goes.
	if isFile(int(w.f.Fd()), w.path) == nil {
		_ = os.Remove(w.path)
	}
	_ = w.f.Close()
	w.f = nil
}

// queued maps the pid of each spare waiting in dir's queue to its place in it, 1 for the first. It only reads: the
// places of dead spares are left to the queue.
func queued(dir string) map[int]int {
	queue := map[int]int{}
	for _, p := range places(dir) {
		if pid, _, free, ok := readLock(p); ok && !free {
			queue[pid] = len(queue) + 1
		}
	}
	return queue
}
