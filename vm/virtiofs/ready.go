package virtiofs

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// readyPollInterval is how often Start looks whether virtiofsd reached accept. It gets there within a few
// milliseconds of exec, so a short interval keeps VM start fast.
const readyPollInterval = 2 * time.Millisecond

// waitReady returns once virtiofsd blocks in accept on the socket Kiln passed in: from then on its
// options and source directory have been checked and QEMU's connection will be served. It fails when virtiofsd
// exits first or ReadyTimeout passes.
func (d *Daemon) waitReady(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, d.cfg.ReadyTimeout)
	defer cancel()
	path := fmt.Sprintf("/proc/%d/syscall", d.proc.PID())
	t := time.NewTicker(readyPollInterval)
	defer t.Stop()
	for {
		b, err := os.ReadFile(path)
		switch {
		case err == nil && inAccept(string(b), listenFD):
			return nil
		case err != nil && !errors.Is(err, os.ErrNotExist) && !errors.Is(err, unix.ESRCH):
			// Without /proc/<pid>/syscall (a kernel without it, or no ptrace access) the socket exists anyway
			// and QEMU's connection waits in its backlog; only an early failure is reported later, by QEMU.
			d.cfg.Log.WithError(err).Debug("cannot see whether virtiofsd is ready; not waiting")
			return nil
		}
		select {
		case <-d.proc.Exited():
			return d.ExitError()
		case <-ctx.Done():
			if errors.Is(ctx.Err(), context.DeadlineExceeded) {
				return fmt.Errorf("virtiofsd did not accept connections within %s%s", d.cfg.ReadyTimeout, d.Diagnostics())
			}
			return ctx.Err()
		case <-t.C:
		}
	}
}

// inAccept reports whether a /proc/<pid>/syscall line shows the thread blocked in accept or accept4 on fd.
// The line is "<nr> <arg1> ... <sp> <pc>" in a system call, "-1 <sp> <pc>" when blocked outside one, and
// "running" otherwise.
func inAccept(line string, fd int) bool {
	f := strings.Fields(line)
	if len(f) < 2 {
		return false
	}
	nr, err := strconv.Atoi(f[0])
	if err != nil || (nr != unix.SYS_ACCEPT && nr != unix.SYS_ACCEPT4) {
		return false
	}
	arg, err := strconv.ParseUint(strings.TrimPrefix(f[1], "0x"), 16, 64)
	return err == nil && arg == uint64(fd)
}
