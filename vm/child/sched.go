package child

import (
	"fmt"
	"runtime"

	"golang.org/x/sys/unix"
)

// startBatch runs start (which forks) from a thread that has SCHED_BATCH meanwhile, so that the new process and
// every thread it makes have that policy from their first instruction. Only a thread of the normal policy is
// switched: a caller that runs with another (batch or idle already, or a real-time one) passes its own on. When
// the policy cannot be read or set (a seccomp filter around Kiln may refuse sched_setattr), the program starts
// all the same, with the caller's policy, and schedErr says why: the policy is worth having, not worth failing
// for. err is start's.
//
// Why batch: a batch thread does not preempt the running one when it wakes, and the scheduler takes it for
// CPU-bound. Under TCG, QEMU's vCPU threads are just that, and on a host with more of them than cores the
// preemptions cost more than they buy (each switch between two emulators leaves the other's translated code and
// data cold in the caches): ten pods started at once on two cores took 13.1 s instead of 18.0 s in `make bench`,
// with one pod's start unchanged.
func startBatch(start func() error, attrs schedAttrs) (schedErr, err error) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	was, err := attrs.get()
	if err != nil {
		return fmt.Errorf("read the forking thread's scheduling policy: %w", err), start()
	}
	if was.Policy != unix.SCHED_NORMAL {
		return nil, start()
	}
	batch := *was
	batch.Size = unix.SizeofSchedAttr
	batch.Policy = unix.SCHED_BATCH
	if err := attrs.set(&batch); err != nil {
		return fmt.Errorf("set SCHED_BATCH on the forking thread: %w", err), start()
	}
	// Going back from batch to the normal policy at the same nice value needs no privilege. Should it fail all the
	// same, the thread stays batch and goes back to Go's pool: it must not end, since the child's parent-death
	// signal is tied to it.
	defer func() { _ = attrs.set(was) }()
	return nil, start()
}

// schedAttrs reads and sets the calling thread's scheduling attributes.
type schedAttrs interface {
	get() (*unix.SchedAttr, error)
	set(*unix.SchedAttr) error
}

// threadSched is the kernel's sched_getattr(2) and sched_setattr(2) on the calling thread.
type threadSched struct{}

func (threadSched) get() (*unix.SchedAttr, error) { return unix.SchedGetAttr(0, 0) }

func (threadSched) set(a *unix.SchedAttr) error { return unix.SchedSetAttr(0, a, 0) }
