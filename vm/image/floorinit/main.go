// Command floorinit is the smallest useful /init: it powers the machine off
// the moment the kernel starts it. Built static (CGO_ENABLED=0) and packed
// into an initramfs of its own by kiln-image, it gives the benchmark's
// floor: the cost of QEMU start, kernel boot and initramfs unpack with
// nothing of Kiln's own on top.
//
//	CGO_ENABLED=0 go build -o _output/bench/floorinit ./vm/image/floorinit
//	kiln-image --init _output/bench/floorinit --kernel _output/share/kiln/vmlinuz \
//	    --kernel-release "$(cat _output/share/kiln/kernel-release)" --out _output/bench/floor-share \
//	    --initrd _output/bench/floor-initrd.img
//
// With -no-reboot QEMU exits when the guest resets, so the wall time of
// the QEMU process is the measurement.
package main

import (
	"os"

	"golang.org/x/sys/unix"
)

func main() {
	// PID 1 exiting would panic the kernel (and panic=-1 reboots, which also
	// ends QEMU), but a clean restart keeps the console free of a panic
	// dump and measures the path a real guest shutdown takes (the agent's
	// PowerOff: a microvm without ACPI cannot power off, a reset ends QEMU).
	unix.Sync()
	err := unix.Reboot(unix.LINUX_REBOOT_CMD_RESTART)
	os.Stderr.WriteString("floorinit: reboot(RESTART): " + err.Error() + "\n")
	os.Exit(1)
}
