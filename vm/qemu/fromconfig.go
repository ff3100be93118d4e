package qemu

import (
	"fmt"
	"net"
	"os"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/kiln-runtime/kiln/config"
	"github.com/kiln-runtime/kiln/vm/accel"
	"github.com/kiln-runtime/kiln/vm/idlease"
	"github.com/kiln-runtime/kiln/vm/virtiofs"
)

// Holdable is a program of a VM's (QEMU, virtiofsd) that its owner can stop for a moment (on) and let go on
// (child.Process.Hold). An alias, so that an owner's func taking any value with that method is a Config.Hold.
type Holdable = interface{ Hold(on bool) }

// Config describes one microVM.
type Config struct {
	ID string
	// StateRoot holds one directory per VM; the VM's is StateRoot/ID.
	StateRoot string
	// QEMU is the emulator binary (a name looked up in PATH, or a path).
	QEMU  string
	Accel accel.Kind
	// VCPUs are the vCPUs the guest's kernel boots with online (its maxcpus= when MaxVCPUs is larger).
	VCPUs int
	// MaxVCPUs are the vCPUs QEMU gives the guest, which it may bring online (the agent's AddVCPUs). 0, or VCPUs,
	// boots the guest with all of them.
	MaxVCPUs int
	// MemoryMiB is the memory the guest's kernel boots with (its mem= when MaxMemoryMiB is larger).
	MemoryMiB int
	// MaxMemoryMiB is the RAM QEMU gives the guest, which it may grow to from MemoryMiB (GrowGuestMemory, then
	// the agent's AddMemory). 0, or MemoryMiB, boots the guest with all of it.
	MaxMemoryMiB int
	// MemoryFile, when set, backs guest RAM with this file instead of an anonymous memfd.
	MemoryFile string
	Kernel     string
	Initrd     string
	// AgentImage, when set, is the agent image (config.Assets.AgentImage): template guests and their clones get it
	// as a read-only virtio-pmem device, and their agent runs from it (agentv1.CmdlineAgentImage). Cold boots
	// have no use for it: microvm has no memory devices.
	AgentImage   string
	KernelParams []string
	// StopTimeout bounds QMP quit before QEMU is killed.
	StopTimeout time.Duration
	// TSCkHz, under TCG, tells the guest kernel the TSC frequency so it skips a calibration that hangs on a busy
	// host. New fills it from the host when zero.
	TSCkHz int
	// Vsock selects the vsock device; empty means VsockVhostUser.
	Vsock VsockMode
	// ConsoleToLog copies guest console lines into Log at debug level.
	ConsoleToLog bool
	// SharedDir, when set, is exported to the guest as a virtio-fs device with tag virtiofs.Tag, served by a
	// virtiofsd that starts before QEMU and stops with it.
	SharedDir string
	// TBSizeMiB, under TCG, bounds the translated-code cache (0: QEMU's default).
	TBSizeMiB int
	// FreePageReporting adds a virtio-balloon device whose guest driver reports freed pages to QEMU.
	FreePageReporting bool
	// Nets are the guest's network devices, in order (virtio-net-device, one per tap).
	Nets []Net
	// Virtiofsd tunes that daemon (binary, cache mode...); Start sets its SourceDir, SocketPath and Log.
	Virtiofsd virtiofs.Config
	Log       *logrus.Entry
	// User, when set, is who QEMU runs as (Uid, Gid, Groups); Kiln switches before QEMU's exec and passes in
	// every descriptor QEMU needs. nil runs QEMU as Kiln's own user. virtiofsd stays Kiln's user: it serves the
	// share with the host's ownership, in its own namespace sandbox.
	User *syscall.Credential
	// Users, when set and User is not, gives each QEMU a uid and gid of its own leased from the range, held until
	// that QEMU was reaped: no QEMU runs as the same user as another VM's.
	Users *idlease.Range
	// Cgroup, when true, starts QEMU and virtiofsd in a cgroup of their own (vm/child.Cgroup), named
	// kiln-vm-<ID>, with a memory limit of the guest's memory (MemoryMiB, then what it grew to) plus MemoryOverheadMiB; it is removed when the VM ends.
	Cgroup bool
	// Confine, when true, starts QEMU confined (vm/confine): no socket but UNIX and netlink ones, and no write to
	// the host's files but /dev/null and those it opens by path for writing (openedByPath), as far as the
	// kernel's Landlock goes; a kernel without Landlock gets the socket filter alone, with a warning.
	Confine bool
	// Background, with Cgroup, starts that cgroup behind every other for CPU (child.Cgroup.Background): a spare's
	// VM, which boots on CPU nothing else wants. Machine.Foreground puts it back.
	Background bool
	// Hold, when set, is handed each program the VM starts (virtiofsd, QEMU) as soon as it runs, for an owner
	// that stops them for a moment and lets them go on (Holdable): a spare's VM, which a task's start holds while
	// it runs beside it (runtime/spare). A program started while its owner holds the others is for it to stop
	// at once.
	Hold func(Holdable)
	// MemoryOverheadMiB is what QEMU and virtiofsd may use beyond guest RAM; 0 means
	// config.DefaultMemoryOverheadMiB.
	MemoryOverheadMiB int
	// TemplateDir, when set, starts the VM from a template of its shape kept there (built by the first VM that
	// needs it) instead of booting it: see startFromTemplate. When that fails the VM boots, with a warning.
	TemplateDir string
	// TemplateMax bounds the templates kept in TemplateDir (least recently used ones go when a new one is built);
	// 0 keeps every template whose files still exist.
	TemplateMax int

	// role is what QEMU is started for: a cold boot unless a template is being built or restored.
	role role
	// agentImageSize is AgentImage's size, which its device is given (New reads it).
	agentImageSize int64
	// templateInputs, for a template or a clone, are the inputs its template is keyed by (templateInputs): the
	// agent image QEMU gets must be the file they describe.
	templateInputs string

	// resolvedAssets are Kernel and Initrd as ConfigFrom resolved them (config.ResolveAssets found both files);
	// Start checks that the files exist only when the paths differ.
	resolvedAssets config.Assets
}

// Net is one guest network device backed by a tap the caller opened. QEMU inherits the tap's descriptor; the
// caller keeps and closes its own.
type Net struct {
	Tap *os.File
	MAC net.HardwareAddr
	// MTU, when set, is offered to the guest driver (VIRTIO_NET_F_MTU).
	MTU int
}

// ConfigFrom turns Kiln's configuration into a machine configuration: it resolves the guest assets and decides
// the accelerator (logging a warning when it falls back to TCG).
func ConfigFrom(cfg config.Config, id string, log *logrus.Entry) (Config, error) {
	assets, err := cfg.ResolveAssets()
	if err != nil {
		return Config{}, err
	}
	choice, err := accel.DefaultHost().Detect(cfg.Hypervisor.Accelerator)
	if err != nil {
		return Config{}, err
	}
	if choice.Fallback {
		log.Warnf("accelerator: %s", choice.Reason)
	}
	mode, err := ResolveVsockMode(cfg.Vsock.Mode)
	if err != nil {
		return Config{}, err
	}
	var user *syscall.Credential
	var users *idlease.Range
	if u, ok, err := cfg.Hypervisor.ResolveUser(); err != nil {
		return Config{}, err
	} else if ok && os.Geteuid() != 0 {
		// Only root can switch; an unprivileged Kiln runs QEMU as itself.
		log.Debugf("hypervisor.user %q ignored: Kiln is not root", cfg.Hypervisor.User)
	} else if ok && u.Range.Count > 0 {
		users = &idlease.Range{First: u.Range.First, Count: u.Range.Count, Dir: idlease.Dir}
	} else if ok {
		user = &syscall.Credential{Uid: u.UID, Gid: u.GID}
	}
	params := append([]string{}, cfg.Hypervisor.KernelParams...)
	if cfg.Agent.Debug {
		params = append(params, "kiln.debug=1")
	}
	var templateDir string
	if cfg.Hypervisor.FastStart == config.FastStartTemplate {
		templateDir = cfg.Hypervisor.TemplateDir
	}
	boot, ram := cfg.Hypervisor.MemoryLayout()
	vcpus, maxVCPUs := cfg.Hypervisor.CPULayout()
	return Config{
		ID:                id,
		StateRoot:         cfg.Runtime.StateDir,
		QEMU:              cfg.Hypervisor.Path,
		Accel:             choice.Kind,
		VCPUs:             vcpus,
		MaxVCPUs:          maxVCPUs,
		MemoryMiB:         boot,
		MaxMemoryMiB:      ram,
		Kernel:            assets.Kernel,
		Initrd:            assets.Initrd,
		AgentImage:        assets.AgentImage,
		KernelParams:      params,
		StopTimeout:       cfg.Hypervisor.StopTimeout.Std(),
		TBSizeMiB:         cfg.Hypervisor.TCGTranslationCacheMiB,
		FreePageReporting: cfg.Hypervisor.FreePageReporting,
		Vsock:             mode,
		Virtiofsd:         virtiofs.Config{Binary: cfg.SharedFS.Virtiofsd, Cache: virtiofs.Cache(cfg.SharedFS.Cache), Xattr: cfg.SharedFS.Xattr},
		ConsoleToLog:      log.Logger.IsLevelEnabled(logrus.DebugLevel),
		User:              user,
		Users:             users,
		Cgroup:            cfg.Hypervisor.Cgroup,
		Confine:           cfg.Hypervisor.Confine,
		MemoryOverheadMiB: cfg.Hypervisor.MemoryOverheadMiB,
		TemplateDir:       templateDir,
		TemplateMax:       cfg.Hypervisor.TemplateMax,
		Log:               log,
		resolvedAssets:    assets,
	}, nil
}

// ResolveVsockMode turns vsock.mode into a device. "auto" is Kiln's own vhost-user device: through it the guest
// reaches only the ports Kiln serves for it. The kernel's vhost-vsock ("vhost", chosen explicitly and only where
// /dev/vhost-vsock opens) is faster, but gives the guest every AF_VSOCK listener of the host: Linux's host side
// lets a guest connect to any port listening on the host's CID, not only the shim's.
func ResolveVsockMode(mode string) (VsockMode, error) {
	return resolveVsockMode(mode, kernelVsockUsable)
}

func resolveVsockMode(mode string, kernelUsable func() error) (VsockMode, error) {
	switch mode {
	case config.VsockVhostUser, config.VsockAuto, "":
		return VsockVhostUser, nil
	case config.VsockVhost:
		if err := kernelUsable(); err != nil {
			return "", fmt.Errorf("vsock.mode = \"vhost\": %w; use \"auto\" or \"vhost-user\"", err)
		}
		return VsockKernel, nil
	default:
		return "", fmt.Errorf("vsock.mode = %q: want \"auto\", \"vhost-user\" or \"vhost\"", mode)
	}
}

func kernelVsockUsable() error {
	f, err := os.OpenFile(KernelVsockDevice, os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("cannot open %s: %w", KernelVsockDevice, err)
	}
	return f.Close()
}
