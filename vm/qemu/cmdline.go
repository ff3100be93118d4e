package qemu

import (
	"fmt"
	"strconv"
	"strings"

	"github.com/kiln-runtime/kiln/vm/accel"
)

// baseKernelParams are needed for a microvm guest to boot quickly and to end QEMU on a panic:
// the console on the only UART, no TSC calibration against absent hardware, and an immediate reboot on panic
// (QEMU runs with -no-reboot, so a panicking guest ends the VMM instead of hanging).
var baseKernelParams = []string{"console=ttyS0", "tsc=reliable", "panic=-1", "quiet", "8250.nr_uarts=1", "i8042.noaux", "i8042.nokbd", "i8042.nopnp"}

// args builds QEMU's command line. It is a pure function of the configuration so it can be tested without QEMU.
func args(c Config, p paths) []string {
	mem := strconv.Itoa(c.MemoryMiB) + "M"
	var backend string
	if c.MemoryFile != "" {
		// A file-backed, shared RAM is what a VM template is restored from.
		backend = fmt.Sprintf("memory-backend-file,id=mem,size=%s,mem-path=%s,share=on", mem, c.MemoryFile)
	} else {
		backend = fmt.Sprintf("memory-backend-memfd,id=mem,size=%s,share=on", mem)
	}
	params := append(append([]string{}, baseKernelParams...), c.KernelParams...)
	if c.Accel == accel.TCG && c.TSCkHz > 0 {
		params = append(params, "tsc_early_khz="+strconv.Itoa(c.TSCkHz))
	}
	a := []string{
		"-name", "kiln-" + c.ID + ",debug-threads=on",
		"-M", "microvm,pit=on,pic=on,rtc=on,isa-serial=on,memory-backend=mem",
		"-accel", string(c.Accel),
		"-m", mem,
		"-smp", strconv.Itoa(c.VCPUs),
		"-object", backend,
		"-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
		"-serial", "stdio",
		"-kernel", c.Kernel,
		"-initrd", c.Initrd,
		"-append", strings.Join(params, " "),
		// vhost-user backends need modern virtio-mmio; the legacy layout is rejected.
		"-global", "virtio-mmio.force-legacy=false",
		"-chardev", "socket,id=vsock,path=" + p.vhostUserVsock,
		"-device", "vhost-user-vsock-device,chardev=vsock",
		"-qmp", "unix:" + p.qmp + ",server=on,wait=off",
	}
	if c.Accel == accel.KVM {
		a = append(a, "-cpu", "host")
	}
	return a
}
