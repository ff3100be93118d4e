package spare

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// stopPoll is how often Stop looks again at the slots and the spares it told to stop.
const stopPoll = 50 * time.Millisecond

// Stop stops the spare shims that hold a slot on this host and that which selects (nil: every one): SIGTERM, on
// which each stops its VM, gives its slot up and exits. It waits until every one of them is gone, and until no
// slot is held by a spare its spawner has not named yet (one starting now, which it then stops too, if selected),
// so that a spare started while it looked is not missed. Spares still running when ctx ends are killed (SIGKILL)
// and named in the error. It returns the spares it stopped.
//
// Only spares in slots are stopped: a spare that has taken a task is that task's shim, though its command line
// still reads "spare" (a pattern over command lines, as pkill's, would stop those tasks' shims too).
func Stop(ctx context.Context, which func(Info) bool) ([]Info, error) { return stop(ctx, Dir, which) }

func stop(ctx context.Context, dir string, which func(Info) bool) ([]Info, error) {
	var stopped []Info
	told := map[int]bool{}
	for {
		held, _, naming := scanSlots(dir)
		for _, sp := range held {
			if told[sp.Pid] || which != nil && !which(sp) {
				continue
			}
			told[sp.Pid] = true
			stopped = append(stopped, sp)
			_ = unix.Kill(sp.Pid, unix.SIGTERM)
		}
		var running []int
		for _, sp := range stopped {
			if unix.Kill(sp.Pid, 0) == nil {
				running = append(running, sp.Pid)
			}
		}
		if len(running) == 0 && len(naming) == 0 {
			return stopped, nil
		}
		select {
		case <-ctx.Done():
			var errs []error
			if len(running) > 0 {
				for _, pid := range running {
					_ = unix.Kill(pid, unix.SIGKILL)
				}
				errs = append(errs, fmt.Errorf("spare shims %v did not stop on SIGTERM (killed)", running))
			}
			if len(naming) > 0 {
				errs = append(errs, fmt.Errorf("slots %v stayed held without naming their spare (its spawner died as it started it?)", naming))
			}
			return stopped, fmt.Errorf("stop spare shims: %w: %w", ctx.Err(), errors.Join(errs...))
		case <-time.After(stopPoll):
		}
	}
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
	for _, e := range entries {
		path := filepath.Join(dir, e.Name())
		if !strings.HasSuffix(path, ".lock") {
			continue
		}
		lock, err := lockFile(path)
		if err != nil {
			continue // held
		}
		if slot, ok := strings.CutSuffix(path, ".lock"); ok && strings.HasSuffix(slot, ".sock") {
			for _, f := range []string{slot, slot + ".log", slot + holdSuffix} {
				_ = os.Remove(f)
			}
		}
		_ = os.Remove(path)
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
