package integration

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/kiln-runtime/kiln/runtime/sandbox"
	"github.com/kiln-runtime/kiln/vm/accel"
	"github.com/kiln-runtime/kiln/vm/qemu"
)

// repoRoot is the directory holding go.mod.
func repoRoot(t testing.TB) string {
	t.Helper()
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			t.Fatal("go.mod not found above the test directory")
		}
		dir = parent
	}
}

// requireVM fails (never skips) when the host cannot run the integration tests, except in -short mode.
func requireVM(t testing.TB) (share string) {
	t.Helper()
	if testing.Short() {
		t.Skip("integration test: boots a real QEMU guest")
	}
	if os.Geteuid() != 0 {
		t.Fatal("integration tests need root")
	}
	share = filepath.Join(repoRoot(t), "_output", "share", "kiln")
	for _, f := range []string{"vmlinuz", "initrd.img", "kernel-release"} {
		if _, err := os.Stat(filepath.Join(share, f)); err != nil {
			t.Fatalf("guest image missing (%v): run `make image`", err)
		}
	}
	return share
}

// buildStatic builds a static guest binary from a package of this module, with env added to the build's
// (GOARCH=386).
func buildStatic(t testing.TB, pkg string, env ...string) string {
	t.Helper()
	out := filepath.Join(t.TempDir(), filepath.Base(pkg))
	cmd := exec.Command("go", "build", "-trimpath", "-o", out, pkg)
	cmd.Dir = repoRoot(t)
	cmd.Env = append(append(os.Environ(), "CGO_ENABLED=0"), env...)
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build %s: %v\n%s", pkg, err, b)
	}
	return out
}

// buildInitrd makes an initramfs with init as /init, next to a copy of the kernel `make image` built.
func buildInitrd(t testing.TB, init string) (kernel, initrd string) {
	t.Helper()
	root := repoRoot(t)
	dir := t.TempDir()
	tool := filepath.Join(root, "_output", "tools", "bin", "kiln-image")
	cmd := exec.Command(tool, append([]string{"-q", "--init", init, "--out", dir}, imageKernelArgs(t)...)...)
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("kiln-image: %v\n%s", err, b)
	}
	return filepath.Join(dir, "vmlinuz"), filepath.Join(dir, "initrd.img")
}

// imageKernelArgs are kiln-image's arguments that pair an initramfs with the kernel of `make image`.
func imageKernelArgs(t testing.TB) []string {
	t.Helper()
	share := requireVM(t)
	release, err := os.ReadFile(filepath.Join(share, "kernel-release"))
	if err != nil {
		t.Fatal(err)
	}
	return []string{"--kernel", filepath.Join(share, "vmlinuz"), "--kernel-release", strings.TrimSpace(string(release))}
}

// testMachine is a QEMU machine with a private state root that is checked for leftovers when the test ends.
func testMachine(t testing.TB, kernel, initrd string, mutate func(*qemu.Config)) *qemu.Machine {
	t.Helper()
	choice, err := accel.DefaultHost().Detect("auto")
	if err != nil {
		t.Fatal(err)
	}
	stateRoot, err := os.MkdirTemp("", "kiln-it-")
	if err != nil {
		t.Fatal(err)
	}
	log := logrus.New()
	log.SetLevel(logrus.WarnLevel)
	id := strings.ToLower(strings.NewReplacer("/", "-", "_", "-").Replace(t.Name()))
	cfg := qemu.Config{
		ID:          id,
		StateRoot:   stateRoot,
		QEMU:        "qemu-system-x86_64",
		Accel:       choice.Kind,
		VCPUs:       1,
		MemoryMiB:   256,
		Kernel:      kernel,
		Initrd:      initrd,
		StopTimeout: 3 * time.Second,
		// As hypervisor.confine's default: the VMs of these tests run confined as users' do.
		Confine: true,
		Log:     logrus.NewEntry(log).WithField("test", t.Name()),
	}
	if mutate != nil {
		mutate(&cfg)
	}
	m, err := qemu.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = m.Stop(context.Background())
		checkNoLeftovers(t, stateRoot, id)
		_ = os.Remove(stateRoot)
	})
	return m
}

// checkNoLeftovers fails when a QEMU of this VM still runs or anything remains in its state root.
func checkNoLeftovers(t testing.TB, stateRoot, id string) {
	t.Helper()
	if pids := qemuProcesses(id); len(pids) > 0 {
		t.Errorf("leftover QEMU process(es) for vm %s: %v", id, pids)
	}
	entries, err := os.ReadDir(stateRoot)
	if err != nil && !os.IsNotExist(err) {
		t.Errorf("read state root: %v", err)
	}
	for _, e := range entries {
		t.Errorf("leftover in state root %s: %s", stateRoot, e.Name())
	}
	for _, d := range vmCgroups(id) {
		t.Errorf("leftover VM cgroup %s", d)
	}
}

// vmCgroups lists the cgroups named after a VM whose id starts with id (kiln-vm-<id>) below this process's own
// cgroups, where Kiln processes started by the test make them.
func vmCgroups(id string) []string {
	b, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		return nil
	}
	var found []string
	for _, l := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		// "4:memory:/a/b" (v1) or "0::/a/b" (v2)
		f := strings.SplitN(l, ":", 3)
		if len(f) != 3 {
			continue
		}
		var base string
		switch {
		case f[1] == "":
			base = "/sys/fs/cgroup/unified"
			if _, err := os.Stat(base); err != nil {
				base = "/sys/fs/cgroup"
			}
		case strings.Contains(f[1], "="):
			continue // named hierarchies (name=systemd) get no VM cgroups
		default:
			base = filepath.Join("/sys/fs/cgroup", f[1])
		}
		m, _ := filepath.Glob(filepath.Join(base, f[2], "kiln-vm-"+id+"*"))
		found = append(found, m...)
	}
	return found
}

// qemuProcesses lists the pids whose command line names a VM whose id starts with id (QEMU runs with
// -name kiln-<id>).
func qemuProcesses(id string) []string {
	var pids []string
	matches, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, f := range matches {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		if bytes.Contains(b, []byte("kiln-"+id)) {
			pids = append(pids, filepath.Base(filepath.Dir(f)))
		}
	}
	return pids
}

func startSandbox(t testing.TB, m *qemu.Machine, dialTimeout time.Duration) *sandbox.Sandbox {
	t.Helper()
	sb, err := sandbox.Start(context.Background(), m, sandbox.Options{DialTimeout: dialTimeout})
	if err != nil {
		t.Fatalf("start sandbox: %v", err)
	}
	t.Cleanup(func() { _ = sb.Stop(context.Background()) })
	return sb
}
