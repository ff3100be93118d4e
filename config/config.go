// Package config owns Kiln's configuration: the TOML file format, built-in defaults, where the file is found,
// and validation. It knows nothing about QEMU command lines or containerd; other packages read the typed values.
package config

import (
	"fmt"
	"time"
)

// AnnotationPrefix is the prefix of the pod annotations Kiln reads; each must be allowed by
// runtime.enable_annotations.
const AnnotationPrefix = "io.kiln."

// DefaultPath is the system-wide configuration file used when neither containerd's runtime options nor PathEnv
// name one.
const DefaultPath = "/etc/kiln/config.toml"

// PathEnv names the environment variable that names the configuration file when containerd's runtime options
// name none. containerd passes its environment to shims, so a node sets it for containerd (a systemd drop-in),
// where a runtime entry cannot have options: containerd 2.4's CRI gives the containers of a pod with a user
// namespace runc's options type, which it cannot build from a runtime entry whose options hold ConfigPath.
const PathEnv = "KILN_CONFIG"

// Accelerator values accepted by hypervisor.accelerator.
const (
	AccelAuto = "auto"
	AccelKVM  = "kvm"
	AccelTCG  = "tcg"
)

// Vsock modes accepted by vsock.mode.
const (
	VsockAuto      = "auto"
	VsockVhostUser = "vhost-user"
	VsockVhost     = "vhost"
)

// Config is the whole effective configuration.
type Config struct {
	Hypervisor Hypervisor `toml:"hypervisor"`
	Vsock      Vsock      `toml:"vsock"`
	SharedFS   SharedFS   `toml:"shared_fs"`
	Agent      Agent      `toml:"agent"`
	Runtime    Runtime    `toml:"runtime"`

	// Source is the file the configuration was read from, empty for built-in defaults.
	Source string `toml:"-"`
	// fromFile holds the "table.key" names the file set.
	fromFile map[string]bool
	// validatedAssets are hypervisor.kernel and hypervisor.initrd as Validate found them on disk during Load;
	// ResolveAssets does not look at those paths again.
	validatedAssets Assets
}

// Hypervisor configures the QEMU microVM.
type Hypervisor struct {
	// Path is the QEMU system emulator binary.
	Path string `toml:"path"`
	// Accelerator is auto, kvm or tcg.
	Accelerator string `toml:"accelerator"`
	// VCPUs are the guest's vCPUs: a pod's VM has them plus its pod's CPU limit (ForPod).
	VCPUs int `toml:"vcpus"`
	// VCPUsMax is the most vCPUs a VM may bring online while it runs (CPULayout); QEMU gives every VM that many,
	// the guest's kernel boots with VCPUs of them online. 0, or VCPUs, keeps every VM at the vCPUs it boots with.
	VCPUsMax int `toml:"vcpus_max"`
	// BootVCPUs, set by ForPod, is VCPUs before the pod's CPU limit was added: what its VM boots with when it can
	// grow. 0 is VCPUs.
	BootVCPUs int `toml:"-"`
	// MemoryMiB is the guest's memory: a pod's VM has it plus the pod's memory limit (ForPod).
	MemoryMiB int `toml:"memory_mib"`
	// MemoryMaxMiB is the most memory a VM may grow to while it runs (MemoryLayout): a pod that needs more than
	// its VM booted with (a spare adopted by a bigger pod, a container's limit raised in place) gets it added. 0
	// keeps every VM at the size it booted with.
	MemoryMaxMiB int `toml:"memory_max_mib"`
	// BootMemoryMiB, set by ForPod, is the memory of a pod's VM before its pod's limit was added (MemoryMiB
	// then): what its VM boots with when it can grow, so that pods of every size share templates and spares.
	// 0 is MemoryMiB.
	BootMemoryMiB int `toml:"-"`
	// Kernel and Initrd are guest asset paths; empty means the installed share/kiln directory.
	Kernel       string   `toml:"kernel"`
	Initrd       string   `toml:"initrd"`
	KernelParams []string `toml:"kernel_params"`
	// StopTimeout bounds each graceful stop step before escalating.
	StopTimeout Duration `toml:"stop_timeout"`
	// TCGTranslationCacheMiB bounds QEMU's translated-code cache under TCG (0: QEMU's own default, up to 1 GiB).
	TCGTranslationCacheMiB int `toml:"tcg_translation_cache_mib"`
	// FreePageReporting gives the guest a virtio-balloon device that reports the pages it frees, so that QEMU
	// returns them to the host.
	FreePageReporting bool `toml:"free_page_reporting"`
	// User is who QEMU runs as (ResolveUser): QEMUUserPerVM, one user, or empty for Kiln's own user.
	User string `toml:"user"`
	// UserRange is where QEMUUserPerVM takes each VM's uid and gid from: "first:count".
	UserRange string `toml:"user_range"`
	// Cgroup puts QEMU and virtiofsd of each VM in a cgroup of their own with a memory limit of the guest's memory
	// (MemoryMiB, and what the VM grew by) plus MemoryOverheadMiB.
	Cgroup            bool `toml:"cgroup"`
	MemoryOverheadMiB int  `toml:"memory_overhead_mib"`
	// Confine confines each QEMU (vm/confine): a seccomp filter refuses it every socket but UNIX and netlink ones,
	// and a Landlock domain lets it write none of the host's files but the few it is given, as far as the host
	// kernel's Landlock reaches.
	Confine bool `toml:"confine"`
	// FastStart is how a VM starts: FastStartOff boots it, FastStartTemplate restores it from a saved template
	// of its shape (kept in TemplateDir), falling back to a boot when that fails.
	FastStart string `toml:"fast_start"`
	// TemplateDir holds the saved templates (guest RAM and device state; each clone copies the RAM into a memfd of
	// its own); it should be on tmpfs.
	TemplateDir string `toml:"template_dir"`
	// TemplateMax bounds the templates kept in TemplateDir: when a new one is built, the least recently used
	// beyond it are removed. Each VM shape (the vCPUs and memory it boots with, kernel parameters: pod annotations
	// can vary them; a VM that cannot grow boots with its pod's limits too) has a template of its own, tens of MiB of
	// tmpfs each.
	TemplateMax int `toml:"template_max"`
	// Spare keeps, for each containerd, shims started ahead of demand with their VMs booted and warmed by a
	// throwaway container: the next task's shim is one of them (runtime/spare). On by default; SpareOn says
	// whether it applies.
	Spare bool `toml:"spare"`
	// SparePool is how many spares wait for each containerd (1 to MaxSparePool): more serve a burst of tasks
	// without a boot, each holding an idle pod's memory while it waits.
	SparePool int `toml:"spare_pool"`
}

// CPULayout is how a VM of h holds its vCPUs: its guest boots with boot of them online, and QEMU gives it most,
// which it may bring online. Without growth (vcpus_max = 0, or no more than the VM boots with) both are VCPUs.
// With it, boot is BootVCPUs, and most vcpus_max, or the pod's vCPUs if it needs more.
func (h Hypervisor) CPULayout() (boot, most int) {
	boot = h.VCPUs
	if h.BootVCPUs > 0 && h.BootVCPUs < h.VCPUs {
		boot = h.BootVCPUs
	}
	if h.VCPUsMax <= boot {
		return h.VCPUs, h.VCPUs
	}
	// No more than the guest kernel brings up (a pod that asks for more has them all, as one that cannot grow).
	return boot, max(min(max(h.VCPUsMax, h.VCPUs), MaxVCPUsMax), boot)
}

// MaxVCPUsMax bounds hypervisor.vcpus_max: the guest kernel's NR_CPUS (vm/image/kernel/guest.config).
const MaxVCPUsMax = 64

// DefaultVCPUsMax is hypervisor.vcpus_max's default. Each vCPU a VM has offline costs the host about 0.4 MB
// (the guest kernel's per-CPU areas and QEMU's vCPU state, measured under TCG) and no CPU time.
const DefaultVCPUsMax = 8

// MemoryBlockMiB is the guest kernel's memory block (x86-64's section), the step a VM's memory grows by: a VM
// that can grow boots with its memory rounded up to it.
const MemoryBlockMiB = 128

// DefaultMemoryMaxMiB is hypervisor.memory_max_mib's default. The RAM a guest has not added costs the host
// nothing but address space (QEMU's and the vhost-user back ends' mappings of it) and QEMU's dirty-page bitmaps.
const DefaultMemoryMaxMiB = 8192

// MaxBootMemoryMiB bounds the memory a VM that can grow boots with: the kernel's mem= is an address, which
// counts the RAM below it only up to the start of the PCI hole below 4 GiB (2 GiB on q35 for a VM of 2.75 GiB or
// more). A VM that would boot with more boots with all of its memory, and does not grow.
const MaxBootMemoryMiB = 2048

// MemoryLayout is how a VM of h holds its memory: its guest boots with boot MiB, and QEMU gives it ram MiB of
// RAM, which it may grow to. Without growth (memory_max_mib = 0, or a boot memory past MaxBootMemoryMiB) both
// are MemoryMiB. With it, boot is BootMemoryMiB and ram memory_max_mib, or the pod's memory if it needs more, each
// rounded up to a memory block. (QEMU gives the guest a block more, for the firmware's tables: vm/qemu's ramMiB.)
func (h Hypervisor) MemoryLayout() (boot, ram int) {
	boot = roundUp(h.BootMemory(), MemoryBlockMiB)
	if h.MemoryMaxMiB == 0 || boot > MaxBootMemoryMiB {
		return h.MemoryMiB, h.MemoryMiB
	}
	return boot, max(roundUp(h.MemoryMaxMiB, MemoryBlockMiB), roundUp(h.MemoryMiB, MemoryBlockMiB))
}

// BootMemory is BootMemoryMiB, or MemoryMiB when it is unset or larger.
func (h Hypervisor) BootMemory() int {
	if h.BootMemoryMiB <= 0 || h.BootMemoryMiB > h.MemoryMiB {
		return h.MemoryMiB
	}
	return h.BootMemoryMiB
}

func roundUp(n, to int) int { return (n + to - 1) / to * to }

// MaxSparePool bounds hypervisor.spare_pool.
const MaxSparePool = 16

// SpareOn says whether spare shims are on: spare is set and fast_start is not "off", which turns every fast path
// off with one key.
func (h Hypervisor) SpareOn() bool { return h.Spare && h.FastStart != FastStartOff }

// SpareIdle is how long a spare shim waits for a task before it stops its VM and exits.
const SpareIdle = 10 * time.Minute

// DefaultTemplateMax is hypervisor.template_max's default: room for the shapes a host commonly runs.
const DefaultTemplateMax = 8

// Values of hypervisor.fast_start.
const (
	FastStartOff      = "off"
	FastStartTemplate = "template"
)

// Vsock configures how the host reaches the guest.
type Vsock struct {
	Mode string `toml:"mode"`
}

// SharedFS configures the virtio-fs share that carries container root filesystems into the guest.
type SharedFS struct {
	// Virtiofsd is the virtio-fs daemon binary.
	Virtiofsd string `toml:"virtiofsd"`
	// Cache is virtiofsd's cache mode: auto, always or none.
	Cache string `toml:"cache"`
	// Xattr passes file capabilities (security.capability) and user.* extended attributes between the guest and
	// the host's files; no other attribute.
	Xattr bool `toml:"xattr"`
}

// Agent configures the host's use of the guest agent.
type Agent struct {
	Debug          bool     `toml:"debug"`
	DialTimeout    Duration `toml:"dial_timeout"`
	RequestTimeout Duration `toml:"request_timeout"`
	// ClockSync is how often the host corrects the guest's wall clock to its own (runtime/guestclock); 0 never.
	ClockSync Duration `toml:"clock_sync"`
}

// Runtime configures host-side bookkeeping.
type Runtime struct {
	// StateDir holds one directory per running VM (sockets, console log).
	StateDir string `toml:"state_dir"`
	LogLevel string `toml:"log_level"`
	// EnableAnnotations lists the io.kiln.* pod annotations honoured (exact names or prefixes ending in "*").
	EnableAnnotations []string `toml:"enable_annotations"`
	// HostLSM is what becomes of a spec's AppArmor profile and SELinux labels, which name host policy a guest
	// kernel does not have (runtime/hostlsm): HostLSMRefuse or HostLSMIgnore.
	HostLSM string `toml:"host_lsm"`
}

// IgnoreHostLSM says whether specs' host LSM settings are taken out rather than refused (runtime.host_lsm).
func (r Runtime) IgnoreHostLSM() bool { return r.HostLSM == HostLSMIgnore }

// The values of runtime.host_lsm.
const (
	// HostLSMRefuse fails a container or exec whose spec sets an AppArmor profile or SELinux label.
	HostLSMRefuse = "refuse"
	// HostLSMIgnore takes them out of the spec the guest gets.
	HostLSMIgnore = "ignore"
)

// Duration is a time.Duration written in TOML as a Go duration string ("5s", "250ms").
type Duration time.Duration

// UnmarshalText parses a Go duration string.
func (d *Duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	if err != nil {
		return fmt.Errorf("want a duration such as \"5s\" or \"250ms\": %w", err)
	}
	*d = Duration(v)
	return nil
}

// MarshalText formats the duration as a Go duration string.
func (d Duration) MarshalText() ([]byte, error) { return []byte(time.Duration(d).String()), nil }

// Std returns the value as a time.Duration.
func (d Duration) Std() time.Duration { return time.Duration(d) }

// Default returns the built-in configuration.
func Default() Config {
	return Config{
		Hypervisor: Hypervisor{
			Path:                   "qemu-system-x86_64",
			Accelerator:            AccelAuto,
			VCPUs:                  2,
			VCPUsMax:               DefaultVCPUsMax,
			MemoryMiB:              256,
			MemoryMaxMiB:           DefaultMemoryMaxMiB,
			KernelParams:           nil,
			StopTimeout:            Duration(3 * time.Second),
			User:                   QEMUUserPerVM,
			UserRange:              DefaultQEMUUserRange,
			Cgroup:                 true,
			Confine:                true,
			MemoryOverheadMiB:      DefaultMemoryOverheadMiB,
			TCGTranslationCacheMiB: DefaultTCGTranslationCacheMiB,
			FreePageReporting:      true,
			FastStart:              FastStartTemplate,
			TemplateDir:            "/dev/shm/kiln/templates",
			TemplateMax:            DefaultTemplateMax,
			Spare:                  true,
			SparePool:              1,
		},
		Vsock: Vsock{Mode: VsockAuto},
		SharedFS: SharedFS{
			Virtiofsd: "/usr/lib/qemu/virtiofsd",
			Cache:     "auto",
			Xattr:     true,
		},
		Agent: Agent{
			DialTimeout:    Duration(60 * time.Second),
			RequestTimeout: Duration(30 * time.Second),
			ClockSync:      Duration(time.Minute),
		},
		Runtime: Runtime{
			StateDir: "/run/kiln",
			LogLevel: "info",
			HostLSM:  HostLSMRefuse,
		},
	}
}
