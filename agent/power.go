package agent

import (
	"os"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"
)

// PowerOff syncs file systems and powers the guest off. It never returns:
// the agent is PID 1 and a PID 1 that exits panics the kernel. When the
// power-off itself fails the agent logs it and blocks forever, leaving the
// host to kill the VM.
//
// Outside PID 1 (a developer running the binary by mistake) it exits the
// process instead of powering off the machine it runs on.
func PowerOff(log *logrus.Entry) {
	if os.Getpid() != 1 {
		log.Error("not PID 1: exiting instead of powering off")
		os.Exit(1)
	}
	log.Info("powering off")
	unix.Sync()
	if err := unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF); err != nil {
		log.WithError(err).Error("power off failed; waiting for the host to stop the guest")
	}
	select {}
}

// Fatal logs err as the reason the agent cannot go on and powers the guest off.
func Fatal(log *logrus.Entry, err error) {
	log.WithError(err).Error("fatal error")
	PowerOff(log)
}
