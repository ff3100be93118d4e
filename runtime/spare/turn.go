package spare

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"time"
)

// Spares boot in turns: a host boots at most Turns of them at once, whichever containerd's pool they fill. A burst
// of tasks that takes a pool's spares spawns a spare for every slot it emptied, and all of them used to boot
// together once their spawners' starts were over: under TCG, ten VMs warming on two cores took 22-31 s each, near
// the agent's 30 s request timeout, and no spare was ready until nearly all were (7 s after make bench's burst of
// ten; docs/fast-start.md, sessions 28 and 29). In turns the first is ready after one boot, and the others follow
// on CPU their VMs do not fight over.

// turnPoll is how often a spare waiting for its turn looks for a free one.
const turnPoll = 50 * time.Millisecond

// Turns is how many spares of vcpus vCPUs a host with cpus CPUs boots at once: as many as the CPUs hold their
// vCPUs, and one at least.
func Turns(cpus, vcpus int) int { return max(1, cpus/max(1, vcpus)) }

// Turn is a spare's turn to boot. Release it once the spare's VM is ready (or failed).
type Turn struct {
	f    *os.File
	path string
}

// WaitTurn waits until the host boots fewer than Turns(runtime.NumCPU(), vcpus) spares, or ctx ends, and takes a
// turn. The turns are locks in Dir held by the spares booting; the kernel gives up those of a spare that dies.
func WaitTurn(ctx context.Context, vcpus int) (*Turn, error) {
	return waitTurn(ctx, Dir, Turns(runtime.NumCPU(), vcpus))
}

func waitTurn(ctx context.Context, dir string, turns int) (*Turn, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("spare shim directory: %w", err)
	}
	tick := time.NewTicker(turnPoll)
	defer tick.Stop()
	for {
		for i := range turns {
			t, err := tryTurn(filepath.Join(dir, "boot-"+strconv.Itoa(i)+".lock"))
			if err != nil || t != nil {
				return t, err
			}
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("wait for a turn to boot: %w", context.Cause(ctx))
		case <-tick.C:
		}
	}
}

// tryTurn takes the turn whose lock is path, or returns nil when a booting spare holds it.
func tryTurn(path string) (*Turn, error) {
	f, err := lockFile(path)
	if errors.Is(err, errTaken) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("spare boot turn: %w", err)
	}
	return &Turn{f: f, path: path}, nil
}

// Release gives the turn to the next spare, removing its lock file while it still holds it (the file of a spare
// that was killed stays until a spare takes that turn). A file at the path that is not the turn's any more (Dir
// removed and the turn taken again meanwhile) is left to its holder. It is idempotent.
func (t *Turn) Release() {
	if t == nil || t.f == nil {
		return
	}
	if isFile(int(t.f.Fd()), t.path) == nil {
		_ = os.Remove(t.path)
	}
	_ = t.f.Close()
	t.f = nil
}
