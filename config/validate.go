package config

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/sirupsen/logrus"
)

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
