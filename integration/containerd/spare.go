package containerd

import (
	"errors"
	"fmt"
	"os"
	"syscall"
	"time"

	"github.com/kiln-runtime/kiln/runtime/spare"
)

// spareOf is the spare shim of the containerd at address, if one holds its slot.
func spareOf(address string) (spare.Info, bool) {
	for _, sp := range spare.All() {
		if sp.Address == address {
			return sp, true
		}
	}
	return spare.Info{}, false
}

// WaitSpare waits up to timeout for a spare shim of the containerd at address to be ready (hypervisor.spare).
func WaitSpare(address string, timeout time.Duration) bool {
	for deadline := time.Now().Add(timeout); ; time.Sleep(50 * time.Millisecond) {
		if sp, ok := spareOf(address); ok && sp.Ready {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
	}
}

// StopSpare stops the spare shim of the containerd at address, if one runs (SIGTERM: it stops its VM), and checks
// that it went with its slot and the slot's files. Spares are on by default: every harness stops its
// containerd's spare before it checks for leftovers, which then exclude nothing.
func StopSpare(address string, timeout time.Duration) error {
	if sp, ok := spareOf(address); ok {
		_ = syscall.Kill(sp.Pid, syscall.SIGTERM)
		for deadline := time.Now().Add(timeout); syscall.Kill(sp.Pid, 0) == nil; time.Sleep(50 * time.Millisecond) {
			if time.Now().After(deadline) {
				_ = syscall.Kill(sp.Pid, syscall.SIGKILL)
				return fmt.Errorf("spare shim %d did not stop on SIGTERM within %s", sp.Pid, timeout)
			}
		}
		if _, ok := spareOf(address); ok {
			return fmt.Errorf("spare shim %d left its slot behind", sp.Pid)
		}
		for _, f := range slotFiles(sp) {
			if _, err := os.Stat(f); err == nil {
				return fmt.Errorf("spare shim %d left %s behind", sp.Pid, f)
			}
		}
	}
	return nil
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

// slotFiles are the files of a spare's slot: its socket, its log and its lock.
func slotFiles(sp spare.Info) []string { return []string{sp.Slot, sp.Slot + ".log", sp.Slot + ".lock"} }

// taskShims drops from pids the spare shim waiting in the slot of the containerd at address: it has no task yet.
func taskShims(address string, pids []int) []int {
	sp, ok := spareOf(address)
	if !ok {
		return pids
	}
	out := pids[:0:0]
	for _, pid := range pids {
		if pid != sp.Pid {
			out = append(out, pid)
		}
	}
	return out
}
