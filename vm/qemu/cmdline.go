package qemu

import (
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/kiln-runtime/kiln/config"
	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
	"github.com/kiln-runtime/kiln/vm/accel"
	"github.com/kiln-runtime/kiln/vm/virtiofs"
)

// baseKernelParams are needed for a microvm guest to boot quickly and to end QEMU on a panic:
// the console on the only UART, no TSC calibration against absent hardware, and an immediate reboot on panic
// (QEMU runs with -no-reboot, so a panicking guest ends the VMM instead of hanging). The reboot is a triple
// fault (reboot=t): the kernel's default order tries the ACPI reset register and the keyboard controller first,
// which a microvm lacks, and a panicking guest was seen to hang there about one time in three under TCG.
var baseKernelParams = []string{"console=ttyS0", "tsc=reliable", "panic=-1", "reboot=t", "quiet", "8250.nr_uarts=1", "i8042.noaux", "i8042.nokbd", "i8042.nopnp"}

// SandboxArg is QEMU's seccomp filter: beyond its default set of refused system calls, no obsolete ones, no
// set*uid/set*gid (so QEMU cannot regain privileges; it is started as its user instead of using -runas), no
// fork or exec, and no changes to CPU affinity or scheduling.
const SandboxArg = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"

// fdLayout numbers the descriptors QEMU inherits (from 3 on, in exec.Cmd.ExtraFiles order). QEMU opens nothing
// by path but the kernel and initrd (and Config.MemoryFile): the QMP listener and the vhost-user connections are
// Kiln's, passed in.
type fdLayout struct {
	qmp int
	// vsockArgs are the vsock device's arguments, numbered by its backend.
	vsockArgs []string
	// virtiofs is a connection to virtiofsd, when Config.SharedDir is set.
	virtiofs int
	// firstNet is the first tap of Config.Nets; the others follow.
	firstNet int
	// vsockChardev is a clone's vhost-user vsock connection (its device is hot-plugged).
	vsockChardev int
	// incomingState is a clone's migration state file.
	incomingState int
	// memory is a clone's guest RAM, a sealed memfd.
	memory int
	// kernel is a clone's kernel stub (kernelStub), or the kernel a guest that may grow boots (bootKernel); 0 for
	// none: QEMU is then given Config.Kernel.
	kernel int
	// agentImage is Config.AgentImage as Kiln opened it (openAgentImage), 0 for the path itself.
	agentImage int
}

// args builds QEMU's command line. It is a pure function of the configuration so it can be tested without QEMU.
func args(c Config, fds fdLayout) []string {
	mem := strconv.Itoa(c.ramMiB()) + "M"
	var backend string
	switch {
	case c.role == roleClone:
		// The clone's copy of its template's RAM, a memfd sealed as QEMU seals its own, reopened through /proc:
		// shared RAM the migration leaves out (x-ignore-shared), as the template's file was.
		backend = fmt.Sprintf("memory-backend-file,id=mem,size=%s,mem-path=/proc/self/fd/%d,share=on", mem, fds.memory)
	case c.MemoryFile != "":
		// A file-backed, shared RAM is what a VM template is saved from.
		backend = fmt.Sprintf("memory-backend-file,id=mem,size=%s,mem-path=%s,share=on", mem, c.MemoryFile)
	default:
		// seal=on is QEMU's default, spelled out because the vhost-user backends depend on it: Kiln's vsock
		// backend refuses guest RAM that could shrink under its mapping (vm/guestmem).
		backend = fmt.Sprintf("memory-backend-memfd,id=mem,size=%s,share=on,seal=on", mem)
	}
	params := append(append([]string{}, baseKernelParams...), c.KernelParams...)
	if c.Accel == accel.TCG {
		// TCG emulates its CPU in software: nothing the guest runs executes speculatively on it, so the guest
		// kernel's speculation mitigations protect nothing there and cost every system call (kvm64 looks to the
		// kernel like a Meltdown-affected Intel CPU: page-table isolation, whose every switch flushes TCG's software
		// TLB). Under KVM the guest sees the host's CPU and keeps them.
		params = append(params, "mitigations=off")
	}
	if c.MaxMemoryMiB > c.MemoryMiB {
		// The kernel takes the RAM below mem= (an address: config.MaxBootMemoryMiB keeps it below the PCI hole)
		// and leaves the rest to be added (GrowGuestMemory, then the agent).
		params = append(params, "mem="+strconv.Itoa(c.MemoryMiB)+"M")
	}
	if c.MaxVCPUs > c.VCPUs {
		// The rest are present and offline, for the agent to bring online (AddVCPUs).
		params = append(params, "maxcpus="+strconv.Itoa(c.VCPUs))
	}
	if c.role == roleCold {
		// A microvm started with acpi=off has no ACPI tables: the guest kernel need not look for them, and does
		// not log an "ACPI BIOS Error" on every boot.
		params = append(params, "acpi=off")
	} else {
		// The template guest's agent zeroes its free memory before the save, which leaves zero pages out
		// (punchZeros), so that each clone copies, and holds, only what the guest uses.
		params = append(params, agentv1.CmdlineTemplate+"=1")
		if c.AgentImage != "" {
			params = append(params, agentv1.CmdlineAgentImage+"=1")
		}
	}
	if c.Accel == accel.TCG && c.TSCkHz > 0 {
		params = append(params, "tsc_early_khz="+strconv.Itoa(c.TSCkHz))
	}
	accelArg := string(c.Accel)
	if c.Accel == accel.TCG && c.TBSizeMiB > 0 {
		accelArg += ",tb-size=" + strconv.Itoa(c.TBSizeMiB)
	}
	kernel := c.Kernel
	if fds.kernel > 0 {
		kernel = fmt.Sprintf("/proc/self/fd/%d", fds.kernel)
	}
	a := []string{
		"-name", "kiln-" + c.ID + ",debug-threads=on",
		"-sandbox", SandboxArg,
	}
	if c.role == roleCold {
		// acpi=off: QEMU 7.2's microvm then names its virtio-mmio devices on the kernel command line
		// (virtio_mmio.device=), which Kiln's guest kernel reads; with ACPI it describes them only in a DSDT the
		// guest would have to interpret under TCG. Without ACPI the guest cannot power off: the agent resets it.
		a = append(a, "-M", "microvm,acpi=off,pit=on,pic=on,rtc=on,isa-serial=on,memory-backend=mem")
	} else {
		a = append(a, "-M", "q35,memory-backend=mem,smbus=off,sata=off")
	}
	a = append(a,
		"-accel", accelArg,
		"-m", memArg(c, mem),
		"-smp", strconv.Itoa(max(c.MaxVCPUs, c.VCPUs)),
		"-object", backend,
		"-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
		"-serial", "stdio",
		"-kernel", kernel,
		"-initrd", c.Initrd,
		"-append", strings.Join(params, " "),
		// Kiln's listening socket: QEMU serves QMP on it.
		"-chardev", fmt.Sprintf("socket,id=qmp,fd=%d,server=on,wait=off", fds.qmp),
		"-mon", "chardev=qmp,mode=control",
	)
	switch c.role {
	case roleCold:
		a = append(a, microvmDevices(c, fds)...)
	case roleTemplate:
		a = append(a, q35Devices(c, fds)...)
	case roleClone:
		a = append(a, q35Devices(c, fds)...)
		a = append(a, cloneBackends(c, fds)...)
	}
	switch c.Accel {
	case accel.KVM:
		a = append(a, "-cpu", "host")
	case accel.TCG:
		a = append(a, "-cpu", tcgCPU)
	}
	return a
}

// tcgCPU is the CPU model TCG emulates. QEMU 7.2's TCG runs each iteration of a rep-prefixed string instruction
// as one translated block, so a guest copying or clearing memory with rep movs/stos is several times slower than
// with a loop of moves. Linux uses rep movsq/stosq for memcpy, memset, copy_{to,from}_user and clear_page on
// CPUs it marks REP_GOOD: AMD from K8 on (QEMU's default, qemu64, is one) and Intel family 6. kvm64 is an Intel
// family 15 CPU, so the guest kernel picks its unrolled loops instead (a 1 GiB pipe copy in the guest: 2.9 s
// on qemu64, 1.4-2.7 s on kvm64). With LAHF/SAHF added it has all of qemu64's features but AMD's SVM and
// 3DNow! prefetch.
const tcgCPU = "kvm64,+lahf_lm"

// netFiles are the taps of nets in order, as QEMU inherits them.
func netFiles(nets []Net) []*os.File {
	files := make([]*os.File, 0, len(nets))
	for _, n := range nets {
		files = append(files, n.Tap)
	}
	return files
}

// microvmDevices are a cold boot's devices: everything on virtio-mmio, from the start.
func microvmDevices(c Config, fds fdLayout) []string {
	// vhost-user backends need modern virtio-mmio; the legacy layout is rejected.
	a := []string{"-global", "virtio-mmio.force-legacy=false"}
	a = append(a, fds.vsockArgs...)
	if c.SharedDir != "" {
		// Guest RAM is already a shared memfd, which vhost-user-fs needs as much as vsock does.
		a = append(a,
			"-chardev", fmt.Sprintf("socket,id=fs,fd=%d", fds.virtiofs),
			"-device", "vhost-user-fs-device,chardev=fs,tag="+virtiofs.Tag,
		)
	}
	if c.FreePageReporting {
		a = append(a, "-device", "virtio-balloon-device,free-page-reporting=on")
	}
	for i, n := range c.Nets {
		// vhost=off: /dev/vhost-net is not everywhere, and QEMU's own tap back end needs nothing from the host.
		a = append(a, "-netdev", fmt.Sprintf("tap,id=net%d,fd=%d,vhost=off", i, fds.firstNet+i))
		dev := fmt.Sprintf("virtio-net-device,netdev=net%d,mac=%s", i, n.MAC)
		if n.MTU > 0 {
			dev += ",host_mtu=" + strconv.Itoa(n.MTU)
		}
		a = append(a, "-device", dev)
	}
	return a
}

// memArg is -m's value: with room beyond the RAM (maxMiB), a slot for the device that takes it.
func memArg(c Config, mem string) string {
	if c.maxMiB() == c.ramMiB() {
		return mem
	}
	return mem + ",slots=1,maxmem=" + strconv.Itoa(c.maxMiB()) + "M"
}

// maxMiB is the most memory QEMU may give the guest (-m's maxmem, or its RAM): a q35 guest with an agent image
// has room for its virtio-pmem device beyond its RAM (1 GiB, more than any agent image needs).
func (c Config) maxMiB() int {
	if c.role == roleCold || c.AgentImage == "" {
		return c.ramMiB()
	}
	return c.ramMiB() + 1024
}

// initrdMax is the highest address the initrd may occupy in a guest that may grow: the top of the memory its
// kernel boots with (bootKernel); 0 for a guest that boots with all its RAM.
func (c Config) initrdMax() uint32 {
	if c.MaxMemoryMiB <= c.MemoryMiB {
		return 0
	}
	return uint32(c.MemoryMiB)<<20 - 1
}

// ramMiB is the RAM QEMU gives the guest: MemoryMiB, or for a guest that may grow MaxMemoryMiB and one more memory
// block. The firmware keeps its tables at the top of the RAM below 4 GiB (SeaBIOS on q35), so the guest never
// adds that block whole (agent.GuestMemory adds whole blocks only): with the spare block it can grow to
// MaxMemoryMiB on every machine.
func (c Config) ramMiB() int {
	if c.MaxMemoryMiB <= c.MemoryMiB {
		return c.MemoryMiB
	}
	return c.MaxMemoryMiB + config.MemoryBlockMiB
}
