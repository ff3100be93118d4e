package spare

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// stopPoll is how often Stop looks again at the slots and the spares it told to stop.
const stopPoll = 50 * time.Millisecond

// Stop stops the spare shims that hold a slot on this host and that which selects (nil: every one): SIGTERM, on
// which each stops its VM, gives its slot up and exits. It waits until every one of them is gone, until no
// slot is held by a spare its spawner has not named yet (one starting now, which it then stops too, if selected),
// so that a spare started while it looked is not missed, and until no selected slot is held by a process that
// does not read as a spare (one that failed and is exiting). When ctx ends, spares that still hold their slots are
// killed (SIGKILL) and named in the error; one that gave its slot up but runs on is named and left: it took a
// task as it was told to stop (its SIGTERM came too late to count), or its VM is slow to stop. It returns the
// spares it told to stop.
//
// Only spares in slots are stopped: a spare that has taken a task is that task's shim, though its command line
// still reads "spare" (a pattern over command lines, as pkill's, would stop those tasks' shims too). A pid is
// signalled only while its process is a spare shim, so that a pid a lock file still names after its spare died
// (and the kernel gave it to another process) is left alone.
func Stop(ctx context.Context, which func(Info) bool) ([]Info, error) {
	return stop(ctx, Dir, which, isSpareShim)
}

func stop(ctx context.Context, dir string, which func(Info) bool, isSpare func(pid int) bool) ([]Info, error) {
	var stopped []Info
	told := map[int]bool{}
	for {
		held, _, naming := scanSlots(dir)
		holding := map[int]bool{}
		// exiting are slots still held by a process that no longer reads as a spare: one on its way out (the
		// kernel drops a dead process's memory, and its command line with it, before its files and the lock).
		// They are waited for, never signalled, so that a pid the kernel gave to another process is left alone.
		var exiting []string
		for _, sp := range held {
			if which != nil && !which(sp) {
				continue
			}
			if !isSpare(sp.Pid) {
				exiting = append(exiting, sp.Slot)
				continue
			}
			holding[sp.Pid] = true
			if !told[sp.Pid] {
				told[sp.Pid] = true
				stopped = append(stopped, sp)
				_ = unix.Kill(sp.Pid, unix.SIGTERM)
			}
		}
		var running []int
		for _, sp := range stopped {
			if unix.Kill(sp.Pid, 0) == nil {
				running = append(running, sp.Pid)
			}
		}
		if len(running) == 0 && len(naming) == 0 && len(exiting) == 0 {
			return stopped, nil
		}
		select {
		case <-ctx.Done():
			var errs []error
			var killed, left []int
			for _, pid := range running {
				if holding[pid] {
					_ = unix.Kill(pid, unix.SIGKILL)
					killed = append(killed, pid)
				} else {
					left = append(left, pid)
				}
			}
			if len(killed) > 0 {
				errs = append(errs, fmt.Errorf("spare shims %v did not stop on SIGTERM (killed)", killed))
			}
			if len(left) > 0 {
				errs = append(errs, fmt.Errorf("spare shims %v gave their slots up but still run (one that took a task as it was told to stop is that task's shim now; left running)", left))
			}
			if len(naming) > 0 {
				errs = append(errs, fmt.Errorf("slots %v stayed held without naming their spare (its spawner died as it started it?)", naming))
			}
			if len(exiting) > 0 {
				errs = append(errs, fmt.Errorf("slots %v stayed held by processes that are no spare shims (left alone)", exiting))
			}
			return stopped, fmt.Errorf("stop spare shims: %w: %w", ctx.Err(), errors.Join(errs...))
		case <-time.After(stopPoll):
		}
	}
}

// isSpareShim says whether process pid runs as a spare shim: one of its arguments is SpareArg (Spawn's command
// line, which a spare that took a task keeps too; Stop only signals those that hold a slot).
func isSpareShim(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	if err != nil {
		return false
	}
	args := strings.Split(string(b), "\x00")
	return len(args) > 1 && slices.Contains(args[1:], SpareArg)
}

// Purge removes what spares no longer use from the spare shims' directory (the slots of failed spares with their
// logs, free boot turns, places in the turns' queue whose spares are gone) and then the directory, when that left
// it empty (`make uninstall`, after Stop). A file it removes is locked first, as a claim locks it, so a spare
// starting meanwhile keeps its slot; one that holds a slot (another installation's, or a test's) keeps the
// directory, and the error says whose.
func Purge() error { return purge(Dir) }

func purge(dir string) error {
	entries, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("purge the spare shims' directory: %w", err)
	}
	seen := map[string]bool{}
	for _, e := range entries {
		// A slot's files go together, under its lock, whichever of them are left: a lost spare keeps its log
		// without its lock, one whose slot went may leave its socket. Any other lock file is a turn or a place.
		lockPath, files := filepath.Join(dir, e.Name()), []string(nil)
		if i := strings.Index(e.Name(), ".sock"); i >= 0 {
			slot := filepath.Join(dir, e.Name()[:i+len(".sock")])
			lockPath, files = slot+".lock", []string{slot, slot + ".log", slot + holdSuffix}
		}
		if !strings.HasSuffix(lockPath, ".lock") || seen[lockPath] {
			continue
		}
		seen[lockPath] = true
		lock, err := lockFile(lockPath)
		if err != nil {
			continue // held
		}
		for _, f := range files {
			_ = os.Remove(f)
		}
		_ = os.Remove(lockPath)
		_ = lock.Close()
	}
	if err := os.Remove(dir); err != nil && !errors.Is(err, os.ErrNotExist) {
		held, _, naming := scanSlots(dir)
		var pids []int
		for _, sp := range held {
			pids = append(pids, sp.Pid)
		}
		return fmt.Errorf("%s left: spare shims %v hold slots in it, %d starting (%v)", dir, pids, len(naming), err)
	}
	return nil
}
