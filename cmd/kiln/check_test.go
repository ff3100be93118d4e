package main

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/kiln-runtime/kiln/config"
	"github.com/kiln-runtime/kiln/runtime/portforward"
	"github.com/kiln-runtime/kiln/runtime/spare"
	"github.com/kiln-runtime/kiln/vm/accel"
)

// A configuration Load validated names an initrd that is gone by the time `kiln check` looks at it: the check
// failed to stat it, ignored the error and dereferenced a nil FileInfo.
func TestCheckGuestReportsAnInitrdThatIsGone(t *testing.T) {
	dir := t.TempDir()
	kernel, initrd := filepath.Join(dir, "vmlinuz"), filepath.Join(dir, "initrd.img")
	for _, p := range []string{kernel, initrd} {
		if err := os.WriteFile(p, []byte("x"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	cfgPath := filepath.Join(dir, "config.toml")
	toml := "[hypervisor]\npath = \"/bin/true\"\nkernel = \"" + kernel + "\"\ninitrd = \"" + initrd + "\"\n"
	if err := os.WriteFile(cfgPath, []byte(toml), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg, err := config.Load(cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	if r := checkGuest(cfg); r.status != "ok" {
		t.Fatalf("with both files: %+v", r)
	}
	if err := os.Remove(initrd); err != nil {
		t.Fatal(err)
	}
	r := checkGuest(cfg)
	if r.status != "FAIL" || !strings.Contains(r.detail, "initrd") || !strings.Contains(r.detail, initrd) {
		t.Errorf("initrd gone: %+v, want a FAIL naming %s", r, initrd)
	}
}

func TestCheckQEMUUserAndCgroup(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("reports differ for a non-root Kiln")
	}
	cfg := config.Default()
	if r := checkQEMUUser(cfg, accel.TCG, etcDir); r.status != "ok" || !strings.Contains(r.detail, "of its own from 1879048192 to 1879113727") {
		t.Errorf("default user: %+v", r)
	}
	shared := cfg
	shared.Hypervisor.User = "65534:65534"
	if r := checkQEMUUser(shared, accel.TCG, etcDir); r.status != "warn" || !strings.Contains(r.detail, "uid 65534 gid 65534") || !strings.Contains(r.detail, `"per-vm"`) {
		t.Errorf("one user for all: %+v", r)
	}
	shared.Hypervisor.User, shared.Hypervisor.UserRange = "per-vm", "5:5"
	if r := checkQEMUUser(shared, accel.TCG, etcDir); r.status != "FAIL" || !strings.Contains(r.detail, "hypervisor.user_range") {
		t.Errorf("a bad range: %+v", r)
	}
	// A range the host's subordinate ids reach into (here a kubelet's user namespaces) is warned about.
	etc := t.TempDir()
	if err := os.WriteFile(filepath.Join(etc, "subuid"), []byte("kubelet:1879048000:1000\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if r := checkQEMUUser(cfg, accel.TCG, etc); r.status != "warn" || !strings.Contains(r.detail, "subuid kubelet (1879048000:1000)") {
		t.Errorf("a range kubelet's ids reach: %+v", r)
	}
	// With KVM the user must open /dev/kvm too, as a VM's start checks: a node whose /dev/kvm only root opens
	// fails here, not at every pod.
	if fi, err := os.Stat("/dev/kvm"); err == nil {
		r := checkQEMUUser(cfg, accel.KVM, etcDir)
		opens := fi.Mode().Perm()&0o006 == 0o006 || fi.Mode().Perm()&0o060 == 0o060
		if opens && (r.status != "ok" || !strings.Contains(r.detail, "/dev/kvm")) || !opens && (r.status != "FAIL" || !strings.Contains(r.detail, "/dev/kvm")) {
			t.Errorf("KVM with /dev/kvm %v: %+v", fi.Mode(), r)
		}
	}
	cfg.Hypervisor.User = ""
	if r := checkQEMUUser(cfg, accel.TCG, etcDir); r.status != "warn" || !strings.Contains(r.detail, "root") {
		t.Errorf("empty user: %+v", r)
	}
	for _, c := range []struct {
		abi            int
		status, detail string
	}{{0, "warn", "no Landlock"}, {2, "ok", "Landlock ABI 2 restricts file writes"}, {6, "ok", "file writes, truncation, TCP, device ioctls, abstract UNIX sockets and signals"}} {
		if r := checkConfine(config.Default(), c.abi); r.status != c.status || !strings.Contains(r.detail, c.detail) || !strings.Contains(r.detail, "no socket but UNIX") {
			t.Errorf("Landlock ABI %d: %+v, want %s naming %q", c.abi, r, c.status, c.detail)
		}
	}
	off := config.Default()
	off.Hypervisor.Confine = false
	if r := checkConfine(off, 7); r.status != "warn" || !strings.Contains(r.detail, "hypervisor.confine = false") {
		t.Errorf("confinement off: %+v", r)
	}
	cfg.Hypervisor.Cgroup = false
	if r := checkCgroup(cfg); r.status != "warn" {
		t.Errorf("cgroup off: %+v", r)
	}
	cfg.Hypervisor.Cgroup = true
	if r := checkCgroup(cfg); r.status != "ok" || !strings.Contains(r.detail, "cgroup v") {
		t.Errorf("cgroup: %+v", r)
	}
}

func TestCheckPortForward(t *testing.T) {
	if r := checkPortForward(func() error { return errors.New("attach: operation not permitted") }); r.status != "warn" || !strings.Contains(r.detail, "operation not permitted") {
		t.Errorf("probe failing: %+v, want a warning with its error", r)
	}
	if os.Geteuid() != 0 {
		return
	}
	// This host (Linux 5.9 or later, root) can attach the program: the real probe says so.
	if r := checkPortForward(portforward.Probe); r.status != "ok" {
		t.Errorf("real probe: %+v", r)
	}
}

func TestCheckFastStart(t *testing.T) {
	fs := map[string]int64{"/dev/shm": unix.TMPFS_MAGIC, "/var": 0xef53}
	fsType := func(p string) (int64, error) {
		if t, ok := fs[p]; ok {
			return t, nil
		}
		return 0, &os.PathError{Op: "statfs", Path: p, Err: os.ErrNotExist}
	}
	tests := []struct {
		name, mode, vsock, dir string
		status, detail         string
	}{
		{"off", config.FastStartOff, config.VsockAuto, "/dev/shm/kiln/templates", "ok", "off"},
		{"on tmpfs, created later", config.FastStartTemplate, config.VsockAuto, "/dev/shm/kiln/templates", "ok", "applies"},
		{"on disk", config.FastStartTemplate, config.VsockAuto, "/var/kiln/templates", "warn", "does not apply: hypervisor.template_dir /var/kiln/templates is not on tmpfs"},
		{"kernel vsock", config.FastStartTemplate, config.VsockVhost, "/dev/shm/kiln/templates", "warn", "does not apply: vsock.mode = \"vhost\""},
		{"no file system at all", config.FastStartTemplate, config.VsockAuto, "/x/templates", "warn", "does not apply: hypervisor.template_dir /x/templates"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := config.Default()
			cfg.Hypervisor.FastStart, cfg.Vsock.Mode, cfg.Hypervisor.TemplateDir = tt.mode, tt.vsock, tt.dir
			r := checkFastStart(cfg, fsType)
			if r.status != tt.status || !strings.Contains(r.detail, tt.detail) {
				t.Errorf("%+v, want %s mentioning %q", r, tt.status, tt.detail)
			}
		})
	}
}

func TestCheckSpare(t *testing.T) {
	waiting := spare.Info{Pid: 41, Address: "/run/containerd/containerd.sock", Ready: true, Slot: "/run/kiln/spare/a.sock"}
	failed := spare.Info{Pid: 42, Address: "/run/k3s/containerd.sock", Slot: "/run/kiln/spare/b.sock"}
	booting := spare.Info{Pid: 43, Address: "/run/containerd/containerd.sock", Slot: "/run/kiln/spare/a-1.sock"}
	queued := spare.Info{Pid: 44, Address: "/run/containerd/containerd.sock", Slot: "/run/kiln/spare/a-2.sock", Queued: 2}
	tests := []struct {
		name           string
		spare          bool
		pool           int
		fastStart      string
		held, failed   []spare.Info
		status, detail string
	}{
		{"default", true, 1, config.FastStartTemplate, nil, nil, "ok", "on: up to 1 per containerd (hypervisor.spare_pool), started by tasks' shims; none now"},
		{"one waiting", true, 1, config.FastStartTemplate, []spare.Info{waiting}, nil, "ok",
			"; pid 41 for /run/containerd/containerd.sock, ready (log /run/kiln/spare/a.sock.log)"},
		{"a pool", true, 4, config.FastStartTemplate, []spare.Info{waiting, booting}, nil, "ok",
			"on: up to 4 per containerd (hypervisor.spare_pool), started by tasks' shims; pid 41 for /run/containerd/containerd.sock, ready (log /run/kiln/spare/a.sock.log); pid 43 for /run/containerd/containerd.sock, booting (log /run/kiln/spare/a-1.sock.log)"},
		{"a queued spare", true, 4, config.FastStartTemplate, []spare.Info{booting, queued}, nil, "ok",
			"pid 43 for /run/containerd/containerd.sock, booting (log /run/kiln/spare/a-1.sock.log); pid 44 for /run/containerd/containerd.sock, waiting for a turn to boot (place 2 in the host's queue) (log /run/kiln/spare/a-2.sock.log)"},
		{"one failed", true, 1, config.FastStartTemplate, []spare.Info{waiting}, []spare.Info{failed}, "warn",
			"; the last spare for /run/k3s/containerd.sock failed (pid 42): see /run/kiln/spare/b.sock.log"},
		{"spare = false", false, 1, config.FastStartTemplate, nil, []spare.Info{failed}, "ok", "off: each task's shim starts its VM (hypervisor.spare = false)"},
		{"fast_start off", true, 1, config.FastStartOff, nil, nil, "ok", "off: each task's shim starts its VM (hypervisor.fast_start = \"off\")"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := config.Default()
			cfg.Hypervisor.Spare, cfg.Hypervisor.SparePool, cfg.Hypervisor.FastStart = tt.spare, tt.pool, tt.fastStart
			r := checkSpare(cfg, func() ([]spare.Info, []spare.Info) { return tt.held, tt.failed })
			if r.status != tt.status || !strings.Contains(r.detail, tt.detail) {
				t.Errorf("%+v, want %s mentioning %q", r, tt.status, tt.detail)
			}
		})
	}
}

// kiln check warns where the default host_lsm would refuse CRI containers: a host with SELinux on (CRI's AppArmor
// default profile passes).
func TestCheckHostLSM(t *testing.T) {
	ignore := config.Default()
	ignore.Runtime.HostLSM = config.HostLSMIgnore
	for _, c := range []struct {
		name              string
		cfg               config.Config
		appArmor, seLinux bool
		status            string
		says              string
	}{
		{"refuse, AppArmor on", config.Default(), true, false, "ok", `default profile containerd's CRI gives every container (a pod's RuntimeDefault) is taken out`},
		{"refuse, SELinux on", config.Default(), false, true, "warn", `SELinux is on here`},
		{"refuse, both off", config.Default(), false, false, "ok", "is refused"},
		{"ignore", ignore, true, true, "ok", "taken out"},
	} {
		t.Run(c.name, func(t *testing.T) {
			r := checkHostLSM(c.cfg, func() bool { return c.appArmor }, func() bool { return c.seLinux })
			if r.status != c.status || !strings.Contains(r.detail, c.says) {
				t.Errorf("%s %q, want %s saying %q", r.status, r.detail, c.status, c.says)
			}
		})
	}
}

func TestCheckGrowth(t *testing.T) {
	for _, tc := range []struct {
		name        string
		memMax, cpu int
		want        string
	}{
		{"defaults", config.DefaultMemoryMaxMiB, config.DefaultVCPUsMax, "on: VMs grow to their pods' limits while they run (in-place resize; one template and spare shape for every size): memory from 256 to 8192 MiB, vCPUs from 2 to 8"},
		{"memory only", 1024, 0, "memory from 256 to 1024 MiB"},
		{"off", 0, 0, "off: each VM keeps the size it boots with"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := config.Default()
			cfg.Hypervisor.MemoryMaxMiB, cfg.Hypervisor.VCPUsMax = tc.memMax, tc.cpu
			if r := checkGrowth(cfg); !strings.Contains(r.detail, tc.want) || r.status != "ok" {
				t.Errorf("checkGrowth = %+v, want %q", r, tc.want)
			}
		})
	}
}
