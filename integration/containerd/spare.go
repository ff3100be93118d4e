package containerd

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/kiln-runtime/kiln/runtime/hostcgroup"
	"github.com/kiln-runtime/kiln/runtime/spare"
)

// sparesOf lists the spare shims of the containerd at address that hold a slot of its pool.
func sparesOf(address string) []spare.Info {
	var out []spare.Info
	for _, sp := range spare.All() {
		if sp.Address == address {
			out = append(out, sp)
		}
	}
	return out
}

// spareOf is a spare shim of the containerd at address, if one holds a slot.
func spareOf(address string) (spare.Info, bool) {
	if spares := sparesOf(address); len(spares) > 0 {
		return spares[0], true
	}
	return spare.Info{}, false
}

// SpareBooting says whether a spare shim of the containerd at address boots: it listens for holds (its slot's
// hold socket) from its spawner's gate's opening until it is ready.
func SpareBooting(address string) bool {
	for _, sp := range sparesOf(address) {
		if _, err := os.Stat(sp.Slot + ".hold"); err == nil {
			return true
		}
	}
	return false
}

// WaitSpare waits up to timeout for a spare shim of the containerd at address to be ready (hypervisor.spare).
func WaitSpare(address string, timeout time.Duration) bool { return WaitSpares(address, 1, timeout) }

// WaitSpares waits up to timeout for n spare shims of the containerd at address to be ready
// (hypervisor.spare_pool).
func WaitSpares(address string, n int, timeout time.Duration) bool {
	for deadline := time.Now().Add(timeout); ; time.Sleep(50 * time.Millisecond) {
		ready := 0
		for _, sp := range sparesOf(address) {
			if sp.Ready {
				ready++
			}
		}
		if ready >= n {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
	}
}

// StopSpare stops the spare shims of the containerd at address, if any run (spare.Stop: SIGTERM, each stops its
// VM; one being started meanwhile too), and checks that they went with their slots and the slots' files. Spares
// are on by default: every harness stops its containerd's spares before it checks for leftovers, which then
// exclude nothing.
func StopSpare(address string, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	spares, err := spare.Stop(ctx, func(sp spare.Info) bool { return sp.Address == address })
	if err != nil {
		return err
	}
	var errs []error
	for _, sp := range sparesOf(address) {
		errs = append(errs, fmt.Errorf("spare shim %d holds its slot %s after the others were stopped", sp.Pid, sp.Slot))
	}
	for _, sp := range spares {
		for _, f := range slotFiles(sp) {
			if _, err := os.Stat(f); err == nil {
				errs = append(errs, fmt.Errorf("spare shim %d left %s behind", sp.Pid, f))
			}
		}
	}
	return errors.Join(errs...)
}

// removeFailedSpare removes what a spare of the containerd at address that failed (a test's QEMU that refuses to
// start, say) kept in its slot for the operator, until the slot's next spare: a test's containerd address is not
// used again.
func removeFailedSpare(address string) error {
	var errs []error
	for _, sp := range spare.Failed() {
		if sp.Address != address {
			continue
		}
		for _, f := range slotFiles(sp) {
			if err := os.Remove(f); err != nil && !errors.Is(err, os.ErrNotExist) {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

// slotFiles are the files of a spare's slot: its socket, its log, its lock and its hold socket.
func slotFiles(sp spare.Info) []string {
	return []string{sp.Slot, sp.Slot + ".log", sp.Slot + ".lock", sp.Slot + ".hold"}
}

// HoldBootingSpare holds the spares of the containerd at address as soon as one boots, as a task's `start` that
// finds no spare ready does (spare.Hold), so that a test's task surely starts beside a held spare. CloseHolds lets
// go.
func HoldBootingSpare(address string, timeout time.Duration) ([]*os.File, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	for ctx.Err() == nil {
		if holds := spare.Hold(ctx, address); len(holds) > 0 {
			return holds, nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	return nil, fmt.Errorf("no spare of %s booted to be held within %s", address, timeout)
}

// CloseHolds lets go of holds (HoldBootingSpare).
func CloseHolds(holds []*os.File) {
	for _, h := range holds {
		_ = h.Close()
	}
}

// HeldSpares lists, for each spare shim of the containerd at address whose programs are stopped (a hold that was
// not let go), the stopped ones.
func HeldSpares(address string) []string {
	var out []string
	for _, sp := range sparesOf(address) {
		if pids := stopped(hostcgroup.Descendants(sp.Pid)); len(pids) > 0 {
			out = append(out, fmt.Sprintf("spare shim %d's programs stopped: %v", sp.Pid, pids))
		}
	}
	return out
}

// taskShims drops from pids the spare shims waiting in the slots of the containerd at address: they have no task
// yet.
func taskShims(address string, pids []int) []int {
	spares := map[int]bool{}
	for _, sp := range sparesOf(address) {
		spares[sp.Pid] = true
	}
	out := pids[:0:0]
	for _, pid := range pids {
		if !spares[pid] {
			out = append(out, pid)
		}
	}
	return out
}

// sparesSeen is what a leftover check's message says of the host's spare slots: each file in spare.Dir, with a
// lock file's contents (its holder's pid and containerd), as the check found them.
func sparesSeen() string {
	entries, err := os.ReadDir(spare.Dir)
	if err != nil {
		return "\n  " + err.Error()
	}
	var b strings.Builder
	for _, e := range entries {
		fmt.Fprintf(&b, "\n  %s", e.Name())
		if strings.HasSuffix(e.Name(), ".lock") {
			if data, err := os.ReadFile(filepath.Join(spare.Dir, e.Name())); err == nil {
				fmt.Fprintf(&b, ": %q", data)
			}
		}
	}
	return b.String()
}
