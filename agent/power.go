package agent

import (
	"os"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"
)

// PowerOff syncs file systems and ends the guest's VM. It never returns:
// the agent is PID 1 and a PID 1 that exits panics the kernel. When the
// reboot call itself fails the agent logs it and blocks forever, leaving the
// host to kill the VM.
//
// It restarts rather than powers off: QEMU runs with -no-reboot, so a reset ends it at once (reboot=t, a triple
// fault, on the kernel command line). A microvm runs with acpi=off (its virtio-mmio devices are then on the
// kernel command line), and without ACPI the kernel turns a power-off into a halt that leaves QEMU running.
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
	if hasAgentImageDevice() {
		// QEMU 7.2's virtio-pmem device has no migration state: in a template's clone it is left reset, and
		// ignores the guest's requests. The kernel's orderly restart would wait forever for the flush that
		// nd_pmem's shutdown asks of the agent image's device (whether or not the agent runs from it). The
		// emergency restart skips the devices' shutdown, which has nothing to do here once the file systems
		// are synced.
		if err := os.WriteFile("/proc/sysrq-trigger", []byte("b"), 0); err != nil {
			log.WithError(err).Error("emergency restart failed; restarting in order")
		}
	}
	if err := unix.Reboot(unix.LINUX_REBOOT_CMD_RESTART); err != nil {
		log.WithError(err).Error("power off (reboot RESTART) failed; waiting for the host to stop the guest")
	}
	select {}
}

// Fatal logs err as the reason the agent cannot go on and powers the guest off.
func Fatal(log *logrus.Entry, err error) {
	log.WithError(err).Error("fatal error")
	PowerOff(log)
}
