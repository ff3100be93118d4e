package manager

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/containerd/containerd/v2/pkg/shim"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"golang.org/x/sys/unix"

	"github.com/kiln-runtime/kiln/runtime/hostcgroup"
	"github.com/kiln-runtime/kiln/runtime/pod"
	"github.com/kiln-runtime/kiln/runtime/task"
	"github.com/kiln-runtime/kiln/vm/qemu"
)

// cgroupEmptyTimeout bounds the wait for the killed VM processes to be reaped and leave their host cgroup.
const cgroupEmptyTimeout = 3 * time.Second

// vmExitTimeout bounds the wait for a dead shim's VM processes to go after SIGKILL.
const vmExitTimeout = 5 * time.Second

// removeReserve is what Cleanup keeps of its context's time, when the killed processes or their cgroup are slow
// to go, for what it removes after them (state directory, share, socket).
const removeReserve = 500 * time.Millisecond

// Cleanup removes what a shim that is gone left of its VM: processes that still name the VM's state directory
// (QEMU, virtiofsd; normally they died with the shim), the state directory, and the share with every mount in
// it, and the shim's socket. It refuses with ErrFailedPrecondition while the shim is alive, and with
// ErrInvalidArgument, touching nothing, a record that names anything but what a shim writes there (see
// task.Record.Validate; socketDir is the task's socket directory, task.SocketDir). Its waits (for the killed
// processes, for their cgroup to empty) end with ctx, keeping time back for the removals after them.
func Cleanup(ctx context.Context, rec task.Record, socketDir string) error {
	if err := rec.Validate(socketDir); err != nil {
		return fmt.Errorf("%w: task record: %v", errdefs.ErrInvalidArgument, err)
	}
	if shimAlive(rec) {
		return fmt.Errorf("%w: shim %d of sandbox %s is running", errdefs.ErrFailedPrecondition, rec.ShimPid, rec.VMID)
	}
	stateDir := filepath.Join(rec.StateDir, rec.VMID)
	var errs []error
	killCtx := ctx
	if deadline, ok := ctx.Deadline(); ok {
		var cancel context.CancelFunc
		killCtx, cancel = context.WithDeadline(ctx, deadline.Add(-removeReserve))
		defer cancel()
	}
	if err := killReferencing(killCtx, stateDir+"/"); err != nil {
		errs = append(errs, err)
	}
	if err := qemu.RemoveState(stateDir); err != nil {
		errs = append(errs, fmt.Errorf("remove VM state %s: %w", stateDir, err))
	}
	if rec.Cgroup != "" {
		// Best effort: the killed QEMU and virtiofsd stay in the cgroup until their new parent reaps them, and a
		// leftover empty cgroup does not keep the task from being reported killed.
		err := hostcgroup.Remove(rec.Cgroup)
		for deadline := time.Now().Add(cgroupEmptyTimeout); err != nil && time.Now().Before(deadline) && killCtx.Err() == nil; {
			time.Sleep(50 * time.Millisecond)
			err = hostcgroup.Remove(rec.Cgroup)
		}
		if err != nil {
			log.G(ctx).WithError(err).WithField("sandbox", rec.VMID).Warn("host cgroup of a dead shim's VM left in place")
		}
	}
	if rec.ShareDir != "" {
		// QEMU is gone and its taps with it; the qdiscs redirecting to them are not: RemoveShare undoes them.
		if err := pod.RemoveShare(rec.ShareDir, true); err != nil {
			errs = append(errs, err)
		}
	}
	// A shim killed outright leaves its socket; a new shim for the group would take it over, but nothing else
	// would remove it.
	if rec.ShimSocket != "" {
		if err := shim.RemoveSocket(rec.ShimSocket); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("remove shim socket %s: %w", rec.ShimSocket, err))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("clean up sandbox %s: %w", rec.VMID, err)
	}
	return nil
}

// shimAlive says whether the shim that wrote rec still runs (and is not this process).
func shimAlive(rec task.Record) bool {
	return rec.ShimPid > 0 && rec.ShimPid != os.Getpid() && isShim(rec.ShimPid)
}

// isShim reports whether pid is a running Kiln shim (and not a process that reused a dead shim's pid).
func isShim(pid int) bool {
	if !qemu.OwnerAlive(pid) {
		return false
	}
	b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "cmdline"))
	return err == nil && bytes.Contains(b, []byte("containerd-shim-kiln-v2"))
}

// killReferencing SIGKILLs every process with an argument that contains needle, and waits for them to go.
func killReferencing(ctx context.Context, needle string) error {
	pids := referencing(needle)
	for _, pid := range pids {
		_ = unix.Kill(pid, unix.SIGKILL)
	}
	deadline := time.Now().Add(vmExitTimeout)
	for len(pids) > 0 {
		var left []int
		for _, pid := range pids {
			if qemu.OwnerAlive(pid) {
				left = append(left, pid)
			}
		}
		pids = left
		if len(pids) == 0 {
			break
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("processes of the VM still running after SIGKILL: %v", pids)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return nil
}

// referencing lists pids whose command line contains needle.
func referencing(needle string) []int {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	var pids []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		// QEMU names its VM's state directory in its environment (qemu.StateDirEnv), virtiofsd on its command line.
		for _, f := range []string{"cmdline", "environ"} {
			b, err := os.ReadFile(filepath.Join("/proc", e.Name(), f))
			if err == nil && bytes.Contains(b, []byte(needle)) {
				pids = append(pids, pid)
				break
			}
		}
	}
	return pids
}
