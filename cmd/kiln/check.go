package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/containerd/containerd/v2/pkg/apparmor"
	"github.com/spf13/cobra"

	"github.com/kiln-runtime/kiln/config"
	"github.com/kiln-runtime/kiln/runtime/portforward"
	"github.com/kiln-runtime/kiln/runtime/spare"
	"github.com/kiln-runtime/kiln/vm/accel"
	"github.com/kiln-runtime/kiln/vm/child"
	"github.com/kiln-runtime/kiln/vm/confine"
	"github.com/kiln-runtime/kiln/vm/idlease"
	"github.com/kiln-runtime/kiln/vm/qemu"
)

// checkResult is one line of `kiln check`.
type checkResult struct {
	name   string
	status string // ok, warn, FAIL
	detail string
}

func newCheck(g *globalFlags) *cobra.Command {
	return &cobra.Command{
		Use:   "check",
		Short: "Check that this host can run Kiln microVMs; exit non-zero when it cannot",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			results := runChecks(g.configPath)
			failed := printChecks(cmd.OutOrStdout(), results)
			if failed > 0 {
				return fmt.Errorf("%d check(s) failed: Kiln cannot run here", failed)
			}
			return nil
		},
	}
}

func printChecks(w io.Writer, results []checkResult) int {
	failed := 0
	for _, r := range results {
		if r.status == "FAIL" {
			failed++
		}
		fmt.Fprintf(w, "%-5s %-12s %s\n", r.status, r.name, r.detail)
	}
	return failed
}

func runChecks(configPath string) []checkResult {
	var out []checkResult
	add := func(name string, err error, ok string) {
		if err != nil {
			out = append(out, checkResult{name, "FAIL", err.Error()})
			return
		}
		out = append(out, checkResult{name, "ok", ok})
	}
	cfg, err := config.Load(configPath)
	if err != nil {
		add("config", err, "")
		cfg = config.Default()
	} else {
		src := cfg.Source
		if src == "" {
			src = "built-in defaults (no " + config.DefaultPath + ")"
		}
		add("config", nil, src)
	}

	choice, err := accel.DefaultHost().Detect(cfg.Hypervisor.Accelerator)
	switch {
	case err != nil:
		add("accelerator", err, "")
	case choice.Fallback:
		out = append(out, checkResult{"accelerator", "warn", fmt.Sprintf("%s: %s", choice.Kind, choice.Reason)})
	default:
		add("accelerator", nil, fmt.Sprintf("%s: %s", choice.Kind, choice.Reason))
	}

	qemuPath, err := exec.LookPath(cfg.Hypervisor.Path)
	if err != nil {
		add("qemu", fmt.Errorf("%q not found: apt-get install qemu-system-x86, or set hypervisor.path", cfg.Hypervisor.Path), "")
	} else {
		v, err := firstLine(qemuPath, "--version")
		if err != nil {
			add("qemu", fmt.Errorf("%s --version: %w", qemuPath, err), "")
		} else {
			add("qemu", nil, qemuPath+": "+v)
		}
	}

	virtiofsd := cfg.SharedFS.Virtiofsd
	if v, err := firstLine(virtiofsd, "--version"); err != nil {
		add("virtiofsd", fmt.Errorf("%s: %w (apt-get install qemu-system-common, or set shared_fs.virtiofsd)", virtiofsd, err), "")
	} else {
		add("virtiofsd", nil, virtiofsd+": "+v)
	}

	out = append(out, checkVsock(cfg.Vsock.Mode))

	out = append(out, checkGuest(cfg))
	out = append(out, checkSandbox(cfg, qemuPath))
	out = append(out, checkQEMUUser(cfg, choice.Kind, etcDir))
	out = append(out, checkCgroup(cfg))
	out = append(out, checkConfine(cfg, confine.ABI()))
	out = append(out, checkFastStart(cfg, qemu.Statfs), checkSpare(cfg, spareSlots), checkGrowth(cfg))
	out = append(out, checkPortForward(portforward.Probe))
	out = append(out, checkHostLSM(cfg, apparmor.HostSupports, hostSELinux))

	if err := checkStateDir(cfg.Runtime.StateDir); err != nil {
		add("state dir", err, "")
	} else {
		add("state dir", nil, cfg.Runtime.StateDir+" is writable")
	}
	return out
}

// checkGuest reports the guest kernel, initrd and agent image. The files are looked at again here: a configuration that Load
// validated may name files that have gone since.
func checkGuest(cfg config.Config) checkResult {
	assets, err := cfg.ResolveAssets()
	if err != nil {
		return checkResult{"guest", "FAIL", err.Error()}
	}
	var sizes [2]int64
	for i, f := range []struct{ what, path string }{{"kernel", assets.Kernel}, {"initrd", assets.Initrd}} {
		st, err := os.Stat(f.path)
		if err != nil {
			return checkResult{"guest", "FAIL", fmt.Sprintf("guest %s: %v (run `make image`, or fix hypervisor.kernel/initrd)", f.what, err)}
		}
		if !st.Mode().IsRegular() {
			return checkResult{"guest", "FAIL", fmt.Sprintf("guest %s %s is not a regular file", f.what, f.path)}
		}
		sizes[i] = st.Size()
	}
	release := "unknown kernel release"
	if b, err := os.ReadFile(filepath.Join(filepath.Dir(assets.Kernel), "kernel-release")); err == nil {
		release = "kernel " + strings.TrimSpace(string(b))
	}
	agentImage := "no agent image (templates' clones hold the agent in their RAM; `make image` builds it)"
	if assets.AgentImage != "" {
		agentImage = "agent image " + assets.AgentImage
	}
	return checkResult{"guest", "ok", fmt.Sprintf("%s (%s), %s (%d bytes), %s", assets.Kernel, release, assets.Initrd, sizes[1], agentImage)}
}

// checkSandbox reports whether this QEMU has -sandbox (seccomp), which every VM is started with.
func checkSandbox(cfg config.Config, qemuPath string) checkResult {
	if qemuPath == "" {
		return checkResult{"sandbox", "FAIL", "no QEMU to ask"}
	}
	b, _ := exec.Command(qemuPath, "-sandbox", "help").CombinedOutput()
	out := strings.TrimSpace(string(b))
	// A QEMU without seccomp support names the option as unknown, unsupported or not enabled ("-sandbox support
	// is not enabled in this QEMU binary"); one with it parses "help" as a bad value.
	if strings.Contains(out, "invalid option") || strings.Contains(out, "no support") || strings.Contains(out, "not supported") ||
		strings.Contains(out, "not enabled") {
		return checkResult{"sandbox", "FAIL", fmt.Sprintf("%s has no -sandbox (seccomp) support: %s", qemuPath, out)}
	}
	return checkResult{"sandbox", "ok", "QEMU runs with -sandbox " + qemu.SandboxArg}
}

// etcDir holds the host's account files (passwd, group, subuid, subgid).
const etcDir = "/etc"

// kubeletDir is kubelet's state directory: where it is, kubelet runs on this host.
const kubeletDir = "/var/lib/kubelet"

// checkQEMUUser reports who QEMU runs as, whether the host's accounts (under etc) hold ids of a per-VM range, and
// whether QEMU's user can read the guest kernel and initrd, and open /dev/kvm when the accelerator is acc, KVM.
func checkQEMUUser(cfg config.Config, acc accel.Kind, etc string) checkResult {
	u, ok, err := cfg.Hypervisor.ResolveUser()
	switch {
	case err != nil:
		return checkResult{"qemu user", "FAIL", err.Error()}
	case !ok && os.Geteuid() == 0:
		return checkResult{"qemu user", "warn", "hypervisor.user is empty: QEMU runs as root"}
	case !ok || os.Geteuid() != 0:
		return checkResult{"qemu user", "warn", fmt.Sprintf("Kiln is not root: QEMU runs as uid %d", os.Geteuid())}
	}
	status, detail := "ok", ""
	if r := u.Range; r.Count > 0 {
		// The range's ids own no file Kiln needs: the first stands for all.
		u.UID, u.GID = r.First, r.First
		detail = fmt.Sprintf("each VM's QEMU runs as a uid and gid of its own from %d to %d (hypervisor.user = %q)", r.First, r.First+r.Count-1, cfg.Hypervisor.User)
		claimed, err := (idlease.Range{First: r.First, Count: r.Count}).Claimed(etc)
		if err != nil {
			return checkResult{"qemu user", "FAIL", fmt.Sprintf("read the host's accounts: %v", err)}
		}
		if len(claimed) > 0 {
			status = "warn"
			detail += fmt.Sprintf("; hypervisor.user_range holds ids of the host's accounts, whose files such a QEMU would own: %s (choose another range)", strings.Join(claimed, ", "))
		}
		if unbounded, err := idlease.KubeletUnbounded(etc, kubeletDir); err != nil {
			return checkResult{"qemu user", "FAIL", fmt.Sprintf("look for kubelet's user-namespace ids: %v", err)}
		} else if unbounded {
			status = "warn"
			detail += fmt.Sprintf("; kubelet runs here with no \"kubelet\" entry in %s/subuid, so pods with user namespaces (hostUsers: false) may get ids of hypervisor.user_range, and a QEMU of such an id would own their files: give kubelet /etc/subuid and /etc/subgid ranges apart from it", etc)
		}
	} else {
		status = "warn"
		detail = fmt.Sprintf("every VM's QEMU runs as uid %d gid %d (hypervisor.user = %q): one a guest took over reaches the others' memory and signals (\"per-vm\" gives each its own)", u.UID, u.GID, cfg.Hypervisor.User)
	}
	if assets, err := cfg.ResolveAssets(); err == nil {
		if err := qemu.CheckReadable(assets, acc, u.UID, u.GID); err != nil {
			return checkResult{"qemu user", "FAIL", err.Error()}
		}
		detail += "; it can read the guest kernel and initrd"
		if acc == accel.KVM {
			detail += " and open /dev/kvm"
		}
	}
	return checkResult{"qemu user", status, detail}
}

// checkConfine reports how far QEMU is confined, with the kernel's Landlock at ABI version abi.
func checkConfine(cfg config.Config, abi int) checkResult {
	if !cfg.Hypervisor.Confine {
		return checkResult{"confine", "warn", "hypervisor.confine = false: a QEMU a guest took over may write the host's files its uid may and reach the host's network"}
	}
	const filter = "no socket but UNIX and netlink ones, no io_uring (seccomp)"
	if abi == 0 {
		return checkResult{"confine", "warn", filter + "; the kernel has no Landlock (Linux 5.13 with landlock in lsm=): QEMU may write the host's files its uid may"}
	}
	return checkResult{"confine", "ok", fmt.Sprintf("QEMU: %s; Landlock ABI %d restricts %s", filter, abi, strings.Join(confine.Restricts(abi), ", "))}
}

// checkCgroup reports the cgroup version and where VM cgroups go.
func checkCgroup(cfg config.Config) checkResult {
	if !cfg.Hypervisor.Cgroup {
		return checkResult{"cgroup", "warn", "hypervisor.cgroup = false: QEMU and virtiofsd stay in the shim's cgroup, with no memory limit of their own"}
	}
	info, err := child.CgroupInfo()
	if err != nil {
		return checkResult{"cgroup", "FAIL", err.Error() + " (set hypervisor.cgroup = false to run without VM cgroups)"}
	}
	return checkResult{"cgroup", "ok", fmt.Sprintf("%s; memory limit the guest's memory (booted and grown) + %d MiB", info, cfg.Hypervisor.MemoryOverheadMiB)}
}

// checkPortForward reports whether CRI port forwarding can reach pods: the shim attaches an eBPF sk_lookup program
// to each pod's network namespace. Pods run without it when it cannot.
func checkPortForward(probe func() error) checkResult {
	if err := probe(); err != nil {
		return checkResult{"port forward", "warn", fmt.Sprintf("CRI port forwarding (kubectl port-forward) will not reach pods: %v (needs Linux 5.9 or later with BPF, and root)", err)}
	}
	return checkResult{"port forward", "ok", "an eBPF sk_lookup program attaches to a network namespace: CRI port forwarding reaches pods"}
}

// checkHostLSM says what becomes of host LSM settings in specs (runtime.host_lsm), and warns where they would
// refuse CRI containers: containerd's CRI gives every container SELinux labels when the host has SELinux on and
// containerd's enable_selinux is set. The AppArmor profile it gives every container when the host supports
// AppArmor is its default one, which passes (hostlsm).
func checkHostLSM(cfg config.Config, appArmor, seLinux func() bool) checkResult {
	if cfg.Runtime.IgnoreHostLSM() {
		return checkResult{"host LSM", "ok", `runtime.host_lsm = "ignore": AppArmor profiles and SELinux labels in specs are taken out; containers run unconfined by them inside their VMs`}
	}
	if seLinux() {
		return checkResult{"host LSM", "warn", `SELinux is on here: with containerd's enable_selinux, CRI gives every container labels, which Kiln refuses (runtime.host_lsm = "refuse"): set runtime.host_lsm = "ignore", or leave enable_selinux off`}
	}
	if appArmor() {
		return checkResult{"host LSM", "ok", `AppArmor is on here: the default profile containerd's CRI gives every container (a pod's RuntimeDefault) is taken out, a Kiln container's default confinement being its VM; a profile a pod names (Localhost) is refused (runtime.host_lsm = "refuse")`}
	}
	return checkResult{"host LSM", "ok", `runtime.host_lsm = "refuse": a container whose spec names an AppArmor profile (other than an engine's default) or SELinux label is refused (AppArmor and SELinux are off here)`}
}

// hostSELinux says whether the host's kernel has SELinux on (its file system is mounted).
func hostSELinux() bool {
	_, err := os.Stat("/sys/fs/selinux/enforce")
	return err == nil
}

func checkVsock(mode string) checkResult {
	m, err := qemu.ResolveVsockMode(mode)
	if err != nil {
		return checkResult{"vsock", "FAIL", err.Error()}
	}
	if m == qemu.VsockKernel {
		return checkResult{"vsock", "ok", mode + " -> vhost: the host kernel's vhost-vsock (" + qemu.KernelVsockDevice + "); the guest can connect to every AF_VSOCK listener of the host"}
	}
	return checkResult{"vsock", "ok", mode + " -> vhost-user: Kiln's own vsock device backend (hybrid vsock over Unix sockets)"}
}

func checkStateDir(dir string) error {
	if err := os.MkdirAll(dir, 0o711); err != nil {
		return fmt.Errorf("create %s: %w (run as root or set runtime.state_dir)", dir, err)
	}
	f, err := os.CreateTemp(dir, ".check-")
	if err != nil {
		return fmt.Errorf("%s is not writable: %w (run as root or set runtime.state_dir)", dir, err)
	}
	name := f.Name()
	f.Close()
	return os.Remove(name)
}

func firstLine(bin string, args ...string) (string, error) {
	b, err := exec.Command(bin, args...).Output()
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) && len(ee.Stderr) > 0 {
			return "", fmt.Errorf("%w: %s", err, strings.TrimSpace(string(ee.Stderr)))
		}
		return "", err
	}
	line, _, _ := strings.Cut(strings.TrimSpace(string(b)), "\n")
	return line, nil
}

// checkFastStart reports how VMs start (hypervisor.fast_start) and whether templates apply on this host: the
// same conditions the VM's start applies (qemu.TemplateDirUnusable, the vsock device), judged by the same code.
func checkFastStart(cfg config.Config, fsType func(path string) (int64, error)) checkResult {
	if cfg.Hypervisor.FastStart != config.FastStartTemplate {
		return checkResult{"fast start", "ok", "off: VMs boot (hypervisor.fast_start = \"off\")"}
	}
	if cfg.Vsock.Mode == config.VsockVhost {
		return checkResult{"fast start", "warn", "does not apply: vsock.mode = \"vhost\" is not hot-plugged into a restored VM yet, VMs boot"}
	}
	if why := qemu.TemplateDirUnusable(cfg.Hypervisor.TemplateDir, fsType); why != "" {
		return checkResult{"fast start", "warn", "does not apply: " + why + "; VMs boot"}
	}
	return checkResult{"fast start", "ok", fmt.Sprintf("applies: pod VMs are restored from templates in %s (tmpfs)", cfg.Hypervisor.TemplateDir)}
}

// checkGrowth reports whether VMs grow to their pods' limits while they run (hypervisor.memory_max_mib,
// vcpus_max), which lets pods of every size share templates and spares and resize in place.
func checkGrowth(cfg config.Config) checkResult {
	h := cfg.Hypervisor
	var grows []string
	if boot, ram := h.MemoryLayout(); boot < ram {
		grows = append(grows, fmt.Sprintf("memory from %d to %d MiB", boot, ram))
	}
	if boot, most := h.CPULayout(); boot < most {
		grows = append(grows, fmt.Sprintf("vCPUs from %d to %d", boot, most))
	}
	if len(grows) == 0 {
		return checkResult{"VM growth", "ok", "off: each VM keeps the size it boots with, its pod's limits included (hypervisor.memory_max_mib, vcpus_max)"}
	}
	return checkResult{"VM growth", "ok", "on: VMs grow to their pods' limits while they run (in-place resize; one template and spare shape for every size): " + strings.Join(grows, ", ")}
}

// spareSlots reads the host's spare slots: those live spares hold, and those a spare left behind when it failed.
func spareSlots() (held, failed []spare.Info) { return spare.All(), spare.Failed() }

// checkSpare reports whether spare shims are on (hypervisor.spare), how many may wait for each containerd
// (hypervisor.spare_pool), which wait now, and which failed (slots reads them).
func checkSpare(cfg config.Config, slots func() (held, failed []spare.Info)) checkResult {
	if !cfg.Hypervisor.SpareOn() {
		why := "hypervisor.spare = false"
		if cfg.Hypervisor.Spare {
			why = "hypervisor.fast_start = \"off\""
		}
		return checkResult{"spare shims", "ok", "off: each task's shim starts its VM (" + why + ")"}
	}
	held, failed := slots()
	var now []string
	for _, sp := range held {
		state := "booting"
		switch {
		case sp.Ready:
			state = "ready"
		case sp.Queued > 0:
			state = fmt.Sprintf("waiting for a turn to boot (place %d in the host's queue)", sp.Queued)
		}
		now = append(now, fmt.Sprintf("pid %d for %s, %s (log %s.log)", sp.Pid, sp.Address, state, sp.Slot))
	}
	if len(now) == 0 {
		now = []string{"none now"}
	}
	status, failures := "ok", ""
	for _, sp := range failed {
		// A slot's next spare takes it over: a failure worth a look, not one that stops anything.
		status = "warn"
		failures += fmt.Sprintf("; the last spare for %s failed (pid %d): see %s.log", sp.Address, sp.Pid, sp.Slot)
	}
	return checkResult{"spare shims", status, fmt.Sprintf("on: up to %d per containerd (hypervisor.spare_pool), started by tasks' shims; ",
		cfg.Hypervisor.SparePool) + strings.Join(now, "; ") + failures}
}
