package agent

import (
	"context"
	"errors"
	"os"
	"os/signal"
	"strconv"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"
)

// StartReaper reaps every child that exits, until ctx is done. As PID 1 the
// agent inherits all orphans of the guest; without reaping they stay zombies.
//
// The reaper collects any child with Wait4(-1), so it would also steal the
// exit status of children the agent starts itself (os/exec's Wait would then
// fail with ECHILD). Child management added later (container processes) must
// coordinate with it: own the single Wait4 loop and hand statuses of known
// pids to their owners instead of running a second reaper.
func StartReaper(ctx context.Context, log *logrus.Entry) {
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, unix.SIGCHLD)
	go func() {
		defer signal.Stop(sigs)
		// Children may have exited before Notify was in place.
		reapAll(log)
		for {
			select {
			case <-ctx.Done():
				return
			case <-sigs:
				reapAll(log)
			}
		}
	}()
}

// reapAll loops because SIGCHLDs coalesce: one signal may stand for many exits.
func reapAll(log *logrus.Entry) {
	for {
		var status unix.WaitStatus
		pid, err := unix.Wait4(-1, &status, unix.WNOHANG, nil)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil || pid <= 0 {
			// ECHILD: no children at all; pid 0: none has exited yet.
			return
		}
		log.WithFields(logrus.Fields{"pid": pid, "status": describeWait(status)}).Debug("reaped orphan")
	}
}

func describeWait(ws unix.WaitStatus) string {
	switch {
	case ws.Exited():
		return "exited " + strconv.Itoa(ws.ExitStatus())
	case ws.Signaled():
		return "killed by " + ws.Signal().String()
	default:
		return "status " + strconv.Itoa(int(ws))
	}
}
