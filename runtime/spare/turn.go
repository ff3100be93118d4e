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

// Spares boot in turns: a host boots as many at once as its CPUs hold their VMs' vCPUs (TurnCPUs), whichever
// containerd's pool they fill. A burst of tasks that takes a pool's spares spawns a spare for every slot
// it emptied, and all of them used to boot together once their spawners' starts were over: under TCG, ten VMs
// warming on two cores took 22-31 s each, near the agent's 30 s request timeout, and no spare was ready until
// nearly all were (7 s after make bench's burst of ten; docs/fast-start-log.md, sessions 28 and 29). In turns the
// first is ready after one boot, and the others follow on CPU their VMs do not fight over.

// turnPoll is how often a spare waiting for its turn looks for a free one.
const turnPoll = 50 * time.Millisecond

// TurnCPUs is how many of a host's cpus CPUs a spare of vcpus vCPUs boots on: one per vCPU, all of them for a VM
// larger than the host. A host boots cpus / TurnCPUs spares of one size at once.
func TurnCPUs(cpus, vcpus int) int { return min(max(1, vcpus), max(1, cpus)) }

// Turn is a spare's turn to boot: a share of the host's CPUs as large as its VM's vCPUs. Release it once the
// spare's VM is ready (or failed).
type Turn struct {
	cpus []cpuLock
}

// cpuLock is one CPU's share of the turns: a lock file held while a spare boots on it.
type cpuLock struct {
	f    *os.File
	path string
}

// WaitTurn waits until the spares booting on the host leave as many of its CPUs free as the VM has vCPUs (all of
// them for a VM larger than the host), or ctx ends, and takes them. Each CPU is a lock in Dir, boot-<n>.lock,
// held by the spare booting on it; the kernel gives up those of a spare that dies. Spares of different sizes
// share the CPUs by their vCPUs, in the order they began to wait (a queue of wait-<time>-<tag>.lock files, each
// locked by its waiter, passed over once its waiter stops stamping it): a spare that needs many CPUs is not passed
// by a stream of spares that need one each, at the price of CPUs left idle while it waits for enough of them. The
// CPUs are those the shim may run on (runtime.NumCPU, its affinity); shims confined to different CPU sets count
// different files.
func WaitTurn(ctx context.Context, vcpus int) (*Turn, error) {
	cpus := max(1, runtime.NumCPU())
	return waitTurn(ctx, Dir, cpus, TurnCPUs(cpus, vcpus))
}

// waitTurn waits in dir's queue for need of the cpus locks in dir.
func waitTurn(ctx context.Context, dir string, cpus, need int) (*Turn, error) {
	place, err := join(dir)
	if err != nil {
		return nil, err
	}
	defer place.leave()
	tick := time.NewTicker(turnPoll)
	defer tick.Stop()
	for {
		if place.first() {
			t, err := tryTurn(dir, cpus, need)
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

// tryTurn takes need of the cpus locks in dir, or none (nil) when fewer are free: a spare holding some while it
// waits for more would keep them from the spares they suffice for.
func tryTurn(dir string, cpus, need int) (*Turn, error) {
	t := &Turn{}
	for i := 0; i < cpus && len(t.cpus) < need; i++ {
		path := filepath.Join(dir, "boot-"+strconv.Itoa(i)+".lock")
		f, err := lockFile(path)
		if errors.Is(err, errTaken) {
			continue
		}
		if err != nil {
			t.Release()
			return nil, fmt.Errorf("spare boot turn: %w", err)
		}
		t.cpus = append(t.cpus, cpuLock{f: f, path: path})
	}
	if len(t.cpus) < need {
		t.Release()
		return nil, nil
	}
	return t, nil
}

// Release gives the turn's CPUs to the next spares, removing each lock file while the turn still holds it (the
// file of a spare that was killed stays until a spare takes that CPU). A file at the path that is not the turn's
// any more (Dir removed and the CPU taken again meanwhile) is left to its holder. It is idempotent.
func (t *Turn) Release() {
	if t == nil {
		return
	}
	for _, c := range t.cpus {
		if isFile(int(c.f.Fd()), c.path) == nil {
			_ = os.Remove(c.path)
		}
		_ = c.f.Close()
	}
	t.cpus = nil
}
