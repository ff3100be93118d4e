// Package config owns Kiln's configuration: the TOML file format, built-in defaults, where the file is found,
// and validation. It knows nothing about QEMU command lines or containerd; other packages read the typed values.
package config

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/pelletier/go-toml/v2"
	"github.com/sirupsen/logrus"
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

// Load reads the configuration. A non-empty path must exist. An empty path means the file PathEnv names if it
// is set (it must exist), else DefaultPath if it exists, else the built-in defaults.
func Load(path string) (Config, error) { return load(path, os.Getenv(PathEnv), DefaultPath) }

func load(path, envPath, systemPath string) (Config, error) {
	if path == "" && envPath != "" {
		if !filepath.IsAbs(envPath) {
			return Config{}, fmt.Errorf("%s=%q: want an absolute path to Kiln's configuration file", PathEnv, envPath)
		}
		path = envPath
	}
	if path == "" {
		if _, err := os.Stat(systemPath); err != nil {
			if errors.Is(err, os.ErrNotExist) {
				cfg := Default()
				return cfg, cfg.Validate()
			}
			return Config{}, fmt.Errorf("config %s: %w", systemPath, err)
		}
		path = systemPath
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return Config{}, fmt.Errorf("read config %s: %w", path, err)
	}
	cfg, keys, err := parse(data)
	if err != nil {
		return Config{}, fmt.Errorf("config %s: %w", path, err)
	}
	cfg.Source, cfg.fromFile = path, keys
	if err := cfg.Validate(); err != nil {
		return Config{}, fmt.Errorf("config %s: %w", path, err)
	}
	cfg.validatedAssets = Assets{Kernel: cfg.Hypervisor.Kernel, Initrd: cfg.Hypervisor.Initrd}
	return cfg, nil
}

// parse decodes TOML over the defaults, and returns the "table.key" names the file sets (fileKeys). Unknown keys,
// keys in another case than Kiln's and wrong types are errors naming the key.
func parse(data []byte) (Config, map[string]bool, error) {
	cfg := Default()
	dec := toml.NewDecoder(bytes.NewReader(data)).DisallowUnknownFields()
	if err := dec.Decode(&cfg); err != nil {
		var strict *toml.StrictMissingError
		if errors.As(err, &strict) {
			keys := make([]string, 0, len(strict.Errors))
			for _, e := range strict.Errors {
				keys = append(keys, joinKey(e.Key()))
			}
			return Config{}, nil, fmt.Errorf("unknown key(s) %v: remove them or check their spelling", keys)
		}
		var de *toml.DecodeError
		if errors.As(err, &de) {
			row, col := de.Position()
			return Config{}, nil, fmt.Errorf("line %d column %d, key %s: %s", row, col, joinKey(de.Key()), de.Error())
		}
		return Config{}, nil, err
	}
	keys, err := fileKeys(data)
	if err != nil {
		return Config{}, nil, err
	}
	if err := exactKeys(keys); err != nil {
		return Config{}, nil, err
	}
	return cfg, keys, nil
}

// exactKeys fails for a table or key that names one of Config's only in another case: the decoder takes
// "VCPUs" for "vcpus", and TOML's keys are case-sensitive, so another reader (and `kiln config show`, which
// reports a key the file sets) would not. keys are the file's (fileKeys); Config's are those Settings lists.
func exactKeys(keys map[string]bool) error {
	settings, err := Default().Settings()
	if err != nil {
		return err
	}
	known, tables := map[string]bool{}, map[string]bool{}
	for _, st := range settings {
		known[st.Key] = true
		table, _, _ := strings.Cut(st.Key, ".")
		tables[table] = true
	}
	seen := map[string]bool{}
	var bad []string
	for k := range keys {
		if known[k] {
			continue
		}
		if table, _, _ := strings.Cut(k, "."); !tables[table] {
			k = table
		}
		if !seen[k] {
			seen[k] = true
			bad = append(bad, k)
		}
	}
	if len(bad) > 0 {
		sort.Strings(bad)
		return fmt.Errorf("key(s) %v: Kiln's tables and keys are written in lower case, as config.toml shows them", bad)
	}
	return nil
}

func joinKey(k toml.Key) string {
	s := ""
	for i, p := range k {
		if i > 0 {
			s += "."
		}
		s += p
	}
	return s
}

// The sizes a VM may have: hypervisor.vcpus and hypervisor.memory_mib, and a pod's after its annotations. No
// more vCPUs than the guest kernel brings up (MaxVCPUsMax): QEMU would start more, and the guest ignore them.
const (
	minVCPUs     = 1
	maxVCPUs     = MaxVCPUsMax
	minMemoryMiB = 64
	maxMemoryMiB = 1 << 20
)

// maxStateDirLen bounds runtime.state_dir: a VM's sockets are <state_dir>/kiln-<16 hex digits>/<socket>, 44 bytes
// more at the longest (vhost-user-vsock.sock), and a Unix socket's path has 107 at most.
const maxStateDirLen = 107 - 44

// checkKernelParams refuses kernel parameters that would change how the rest of the command line reads: Kiln's
// own parameters (mem=, maxcpus=, the virtio-mmio devices QEMU adds) come after them, and after "--" the kernel
// hands everything to init, as it does the rest of a value whose quote is not closed.
func checkKernelParams(key string, params []string) error {
	for _, p := range params {
		if p == "--" || strings.Count(p, `"`)%2 != 0 || strings.ContainsAny(p, "\x00\n") {
			return fmt.Errorf("%s: %q would change how the parameters after it read (\"--\", an unclosed quote, a NUL or newline); remove it", key, p)
		}
	}
	return nil
}

// Validate checks ranges and enumerations; each error names the key and what is accepted.
func (c Config) Validate() error {
	var errs []error
	switch c.Hypervisor.Accelerator {
	case AccelAuto, AccelKVM, AccelTCG:
	default:
		errs = append(errs, fmt.Errorf("hypervisor.accelerator = %q: want \"auto\", \"kvm\" or \"tcg\"", c.Hypervisor.Accelerator))
	}
	if c.Hypervisor.VCPUs < minVCPUs || c.Hypervisor.VCPUs > maxVCPUs {
		errs = append(errs, fmt.Errorf("hypervisor.vcpus = %d: want %d to %d", c.Hypervisor.VCPUs, minVCPUs, maxVCPUs))
	}
	if c.Hypervisor.MemoryMiB < minMemoryMiB || c.Hypervisor.MemoryMiB > maxMemoryMiB {
		errs = append(errs, fmt.Errorf("hypervisor.memory_mib = %d: want %d to %d", c.Hypervisor.MemoryMiB, minMemoryMiB, maxMemoryMiB))
	}
	if m := c.Hypervisor.VCPUsMax; m < 0 || m > MaxVCPUsMax {
		errs = append(errs, fmt.Errorf("hypervisor.vcpus_max = %d: want 0 (VMs keep the vCPUs they boot with) to %d, the guest kernel's most", m, MaxVCPUsMax))
	}
	// Below memory_mib it only means a VM grows no further than the memory its pod needs (MemoryLayout).
	if m := c.Hypervisor.MemoryMaxMiB; m != 0 && (m < minMemoryMiB || m > maxMemoryMiB) {
		errs = append(errs, fmt.Errorf("hypervisor.memory_max_mib = %d: want 0 (VMs keep the memory they boot with) or %d to %d", m, minMemoryMiB, maxMemoryMiB))
	}
	if c.Hypervisor.TCGTranslationCacheMiB < 0 || c.Hypervisor.TCGTranslationCacheMiB > 4096 {
		errs = append(errs, fmt.Errorf("hypervisor.tcg_translation_cache_mib = %d: want 0 (QEMU's default) to 4096", c.Hypervisor.TCGTranslationCacheMiB))
	}
	if c.Hypervisor.SparePool < 1 || c.Hypervisor.SparePool > MaxSparePool {
		errs = append(errs, fmt.Errorf("hypervisor.spare_pool = %d: want 1 to %d spares per containerd (hypervisor.spare = false turns them off)", c.Hypervisor.SparePool, MaxSparePool))
	}
	if c.Hypervisor.StopTimeout <= 0 {
		errs = append(errs, fmt.Errorf("hypervisor.stop_timeout must be positive"))
	}
	if _, _, err := c.Hypervisor.ResolveUser(); err != nil {
		errs = append(errs, err)
	} else if strings.TrimSpace(c.Hypervisor.User) != QEMUUserPerVM && c.Hypervisor.UserRange != "" {
		// Unused with one user for all, but checked all the same: it is what "per-vm" would take.
		if _, err := parseIDRange(c.Hypervisor.UserRange); err != nil {
			errs = append(errs, err)
		}
	}
	if c.Hypervisor.MemoryOverheadMiB < 64 || c.Hypervisor.MemoryOverheadMiB > 1<<20 {
		errs = append(errs, fmt.Errorf("hypervisor.memory_overhead_mib = %d: want 64 to 1048576", c.Hypervisor.MemoryOverheadMiB))
	}
	switch c.Hypervisor.FastStart {
	case FastStartOff, FastStartTemplate:
	default:
		errs = append(errs, fmt.Errorf("hypervisor.fast_start = %q: want \"off\" or \"template\"", c.Hypervisor.FastStart))
	}
	if c.Hypervisor.TemplateMax < 1 || c.Hypervisor.TemplateMax > 1024 {
		errs = append(errs, fmt.Errorf("hypervisor.template_max = %d: want 1 to 1024", c.Hypervisor.TemplateMax))
	}
	if c.Hypervisor.FastStart == FastStartTemplate && !filepath.IsAbs(c.Hypervisor.TemplateDir) {
		errs = append(errs, fmt.Errorf("hypervisor.template_dir = %q: want an absolute path (on tmpfs) for fast_start = \"template\"", c.Hypervisor.TemplateDir))
	}
	switch c.Vsock.Mode {
	case VsockAuto, VsockVhostUser, VsockVhost:
	default:
		errs = append(errs, fmt.Errorf("vsock.mode = %q: want \"auto\", \"vhost-user\" or \"vhost\"", c.Vsock.Mode))
	}
	if c.Agent.DialTimeout <= 0 {
		errs = append(errs, fmt.Errorf("agent.dial_timeout must be positive"))
	}
	if c.Agent.RequestTimeout <= 0 {
		errs = append(errs, fmt.Errorf("agent.request_timeout must be positive"))
	}
	if c.Agent.ClockSync != 0 && c.Agent.ClockSync < Duration(time.Second) {
		errs = append(errs, fmt.Errorf("agent.clock_sync = %q: want \"0s\" (never) or at least \"1s\"", c.Agent.ClockSync.Std()))
	}
	for _, p := range []struct{ key, path string }{{"hypervisor.kernel", c.Hypervisor.Kernel}, {"hypervisor.initrd", c.Hypervisor.Initrd}} {
		if p.path == "" {
			continue
		}
		if _, err := os.Stat(p.path); err != nil {
			errs = append(errs, fmt.Errorf("%s = %q: %w (run `make image` or fix the path)", p.key, p.path, err))
		}
	}
	switch c.SharedFS.Cache {
	case "auto", "always", "none":
	default:
		errs = append(errs, fmt.Errorf("shared_fs.cache = %q: want \"auto\", \"always\" or \"none\"", c.SharedFS.Cache))
	}
	if _, err := logrus.ParseLevel(c.Runtime.LogLevel); err != nil {
		errs = append(errs, fmt.Errorf("runtime.log_level = %q: want trace, debug, info, warn, error, fatal or panic", c.Runtime.LogLevel))
	}
	switch c.Runtime.HostLSM {
	case HostLSMRefuse, HostLSMIgnore:
	default:
		errs = append(errs, fmt.Errorf("runtime.host_lsm = %q: want %q or %q", c.Runtime.HostLSM, HostLSMRefuse, HostLSMIgnore))
	}
	for _, a := range c.Runtime.EnableAnnotations {
		if !strings.HasPrefix(a, AnnotationPrefix) {
			errs = append(errs, fmt.Errorf("runtime.enable_annotations: %q does not start with %q", a, AnnotationPrefix))
		}
	}
	if _, err := exec.LookPath(c.Hypervisor.Path); err != nil {
		errs = append(errs, fmt.Errorf("hypervisor.path = %q: not found (apt-get install qemu-system-x86, or fix the path)", c.Hypervisor.Path))
	}
	if _, err := os.Stat(c.SharedFS.Virtiofsd); err != nil {
		errs = append(errs, fmt.Errorf("shared_fs.virtiofsd = %q: %w (apt-get install qemu-system-common, or fix the path)", c.SharedFS.Virtiofsd, err))
	}
	if !filepath.IsAbs(c.Runtime.StateDir) {
		errs = append(errs, fmt.Errorf("runtime.state_dir = %q: want an absolute path", c.Runtime.StateDir))
	}
	if n := len(filepath.Clean(c.Runtime.StateDir)); n > maxStateDirLen {
		errs = append(errs, fmt.Errorf("runtime.state_dir = %q: %d bytes, want at most %d (a VM's sockets go below it, and a Unix socket's path has 107 bytes at most)", c.Runtime.StateDir, n, maxStateDirLen))
	}
	if err := checkKernelParams("hypervisor.kernel_params", c.Hypervisor.KernelParams); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}
