package integration

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/console"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/kiln-runtime/kiln/integration/testbundle"
	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
)

// runBundleDir writes a bundle whose config.json is what `runc spec` makes (terminal on, read-only root),
// running args.
func runBundleDir(t *testing.T, args ...string) string {
	t.Helper()
	dir := t.TempDir()
	spec := testbundle.Spec(args...)
	spec.Process.Terminal = true
	if err := testbundle.Write(dir, spec); err != nil {
		t.Fatal(err)
	}
	return dir
}

// checkRunLeftovers fails when `kiln run` left a VM, a virtiofsd, a mount or a file in its state directory.
func checkRunLeftovers(t *testing.T, stateRoot string) {
	t.Helper()
	checkNoLeftovers(t, stateRoot, "run-")
	if pids := virtiofsdProcesses(stateRoot); len(pids) > 0 {
		t.Errorf("leftover virtiofsd process(es): %v", pids)
	}
	if mps := mountsUnder(stateRoot); len(mps) > 0 {
		t.Errorf("leftover mounts: %v", mps)
	}
}

// withoutLogs drops kiln's own log lines (logrus text format) from stderr, leaving the container's.
func withoutLogs(stderr string) string {
	var keep []string
	for _, l := range strings.SplitAfter(stderr, "\n") {
		if !strings.HasPrefix(l, "time=") && !strings.HasPrefix(l, "level=") && l != "" {
			keep = append(keep, l)
		}
	}
	return strings.Join(keep, "")
}

// The first "Done when": a `runc spec` bundle running sh prints on both streams and exits 7.
func TestCLIRun(t *testing.T) {
	bin, cfg, stateRoot := kilnCLI(t)
	bundle := runBundleDir(t, "sh", "-c", "echo out; echo err >&2; exit 7")
	cmd := exec.Command(bin, "--config", cfg, "run", "--bundle", bundle, "ctr1")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	start := time.Now()
	err := cmd.Run()
	t.Logf("kiln run took %s", time.Since(start).Round(time.Millisecond))
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 7 {
		t.Fatalf("kiln run: %v, want exit status 7; stderr:\n%s", err, stderr.String())
	}
	if stdout.String() != "out\n" {
		t.Errorf("stdout %q, want \"out\\n\"", stdout.String())
	}
	if got := withoutLogs(stderr.String()); got != "err\n" {
		t.Errorf("stderr %q, want \"err\\n\" (full stderr %q)", got, stderr.String())
	}
	checkRunLeftovers(t, stateRoot)
}

// A create that fails after its create hooks ran (here a failing createRuntime hook) runs the poststop hooks, as
// the shim's does, and leaves no mark in the bundle that they are owed.
func TestCLIRunFailedCreateRunsPoststop(t *testing.T) {
	bin, cfg, stateRoot := kilnCLI(t)
	dir := t.TempDir()
	ran := filepath.Join(dir, "poststop-ran")
	spec := testbundle.Spec("true")
	spec.Hooks = &specs.Hooks{
		CreateRuntime: []specs.Hook{{Path: "/bin/sh", Args: []string{"sh", "-c", "exit 3"}}},
		Poststop:      []specs.Hook{{Path: "/bin/sh", Args: []string{"sh", "-c", "echo ran > " + ran}}},
	}
	bundle := filepath.Join(dir, "bundle")
	if err := testbundle.Write(bundle, spec); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(bin, "--config", cfg, "run", "--bundle", bundle, "hooked").CombinedOutput()
	if err == nil || !strings.Contains(string(out), "createRuntime") {
		t.Fatalf("kiln run with a failing createRuntime hook: %v\n%s", err, out)
	}
	if b, err := os.ReadFile(ran); err != nil || string(b) != "ran\n" {
		t.Errorf("the poststop hook did not run: %q %v\n%s", b, err, out)
	}
	if left, _ := filepath.Glob(filepath.Join(bundle, "kiln-*")); len(left) > 0 {
		t.Errorf("left in the bundle: %v", left)
	}
	checkRunLeftovers(t, stateRoot)
}

// SIGTERM to kiln reaches the container's init, whose trap decides the exit status.
func TestCLIRunForwardsSIGTERM(t *testing.T) {
	bin, cfg, stateRoot := kilnCLI(t)
	bundle := runBundleDir(t, "sh", "-c", `trap 'echo got-term; exit 42' TERM; echo ready; while :; do sleep 0.1; done`)
	cmd := exec.Command(bin, "--config", cfg, "run", "--bundle", bundle, "ctr-term")
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	lines := make(chan string, 8)
	go func() {
		s := bufio.NewScanner(out)
		for s.Scan() {
			lines <- s.Text()
		}
		close(lines)
	}()
	timeout := time.After(60 * time.Second)
	waitLine := func(want string) {
		for {
			select {
			case l, ok := <-lines:
				if !ok {
					t.Fatalf("stdout ended before %q; stderr:\n%s", want, stderr.String())
				}
				if l == want {
					return
				}
			case <-timeout:
				_ = cmd.Process.Kill()
				t.Fatalf("no %q on stdout; stderr:\n%s", want, stderr.String())
			}
		}
	}
	waitLine("ready")
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	waitLine("got-term")
	err = cmd.Wait()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 42 {
		t.Errorf("kiln run: %v, want exit status 42; stderr:\n%s", err, stderr.String())
	}
	checkRunLeftovers(t, stateRoot)
}

// With --tty the process runs on a terminal of the size of kiln's; a size change (SIGWINCH) reaches it, and
// kiln's terminal is out of raw mode again afterwards.
func TestCLIRunTTY(t *testing.T) {
	bin, cfg, stateRoot := kilnCLI(t)
	bundle := runBundleDir(t, "sh", "-c",
		`test -t 0 && echo on-a-tty; stty size; while [ "$(stty size)" != "43 132" ]; do sleep 0.1; done; echo resized`)
	master, slavePath, err := console.NewPty()
	if err != nil {
		t.Fatal(err)
	}
	defer master.Close()
	if err := master.Resize(console.WinSize{Height: 24, Width: 80}); err != nil {
		t.Fatal(err)
	}
	slave, err := os.OpenFile(slavePath, os.O_RDWR|syscall.O_NOCTTY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer slave.Close()
	before, err := unix.IoctlGetTermios(int(slave.Fd()), unix.TCGETS)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "--config", cfg, "run", "--tty", "--bundle", bundle, "ctr-tty")
	cmd.Stdin, cmd.Stdout, cmd.Stderr = slave, slave, slave
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	out := newLineWatcher()
	go func() { _, _ = io.Copy(out, master) }()
	out.waitFor(t, "24 80", 60*time.Second)
	if err := master.Resize(console.WinSize{Height: 43, Width: 132}); err != nil {
		t.Fatal(err)
	}
	// The kernel signals only a terminal's foreground process group; kiln's test terminal is not its
	// controlling one, so the signal is sent by hand.
	if err := cmd.Process.Signal(syscall.SIGWINCH); err != nil {
		t.Fatal(err)
	}
	out.waitFor(t, "resized", 30*time.Second)
	if err := cmd.Wait(); err != nil {
		t.Errorf("kiln run --tty: %v; output %q", err, out.String())
	}
	if !strings.Contains(out.String(), "on-a-tty") {
		t.Errorf("output %q: the process had no terminal", out.String())
	}
	after, err := unix.IoctlGetTermios(int(slave.Fd()), unix.TCGETS)
	if err != nil {
		t.Fatal(err)
	}
	if after.Lflag != before.Lflag || after.Iflag != before.Iflag || after.Oflag != before.Oflag {
		t.Errorf("terminal modes not restored: lflag %#x -> %#x, iflag %#x -> %#x, oflag %#x -> %#x",
			before.Lflag, after.Lflag, before.Iflag, after.Iflag, before.Oflag, after.Oflag)
	}
	checkRunLeftovers(t, stateRoot)
}

// A `runc spec` bundle (read-only root) whose rootfs lacks /proc, /sys and /dev runs as it does with runc: the
// mount points are made before the root becomes read-only, and the root is read-only for the container.
func TestCLIRunReadonlyRootWithoutMountPoints(t *testing.T) {
	bin, cfg, stateRoot := kilnCLI(t)
	dir := t.TempDir()
	spec := testbundle.Spec("sh", "-c", "test -d /proc/self && ! touch /x 2>/dev/null && echo ok")
	if err := testbundle.Write(dir, spec); err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{"proc", "sys", "dev"} {
		if err := os.RemoveAll(filepath.Join(dir, "rootfs", d)); err != nil {
			t.Fatal(err)
		}
	}
	if !spec.Root.Readonly {
		t.Fatal("runc's spec has a read-only root")
	}
	cmd := exec.Command(bin, "--config", cfg, "run", "--bundle", dir, "noproc")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil || stdout.String() != "ok\n" {
		t.Errorf("kiln run: %v, stdout %q; stderr:\n%s", err, stdout.String(), stderr.String())
	}
	// The mount points went into the guest's layer above the read-only export, not into the host's directory.
	for _, d := range []string{"proc", "sys", "dev"} {
		if _, err := os.Lstat(filepath.Join(dir, "rootfs", d)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("rootfs/%s on the host after the run: %v (want it not to exist)", d, err)
		}
	}
	checkRunLeftovers(t, stateRoot)
}

// Host mounts below a read-only root given as a directory show in the container, as under runc, but read-only
// (runc leaves a writable one writable): the guest layers the root's export, which holds none of them, and they
// come as read-only binds of their own.
func TestCLIRunReadonlyRootShowsMountsBelowIt(t *testing.T) {
	bin, cfg, stateRoot := kilnCLI(t)
	dir := t.TempDir()
	spec := testbundle.Spec("sh", "-c", "cat /data/marker && ! touch /data/new 2>/dev/null && ! touch /x 2>/dev/null && echo ok")
	if err := testbundle.Write(dir, spec); err != nil {
		t.Fatal(err)
	}
	data := filepath.Join(dir, "rootfs", "data")
	if err := os.Mkdir(data, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("tmpfs", data, "tmpfs", 0, "size=1m"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = unix.Unmount(data, unix.MNT_DETACH) })
	if err := os.WriteFile(filepath.Join(data, "marker"), []byte("host mount\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "--config", cfg, "run", "--bundle", dir, "rosub")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil || stdout.String() != "host mount\nok\n" {
		t.Errorf("kiln run: %v, stdout %q; stderr:\n%s", err, stdout.String(), stderr.String())
	}
	if _, err := os.Lstat(filepath.Join(data, "new")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the guest wrote the mount below the read-only root: %v", err)
	}
	checkRunLeftovers(t, stateRoot)
}

// A read-only root is read-only on the host, not only in the guest: a process with the guest's whole power over
// the shared file system (here a container with CAP_SYS_ADMIN mounting the VM's virtio-fs tag itself, as a guest
// kernel taken over could write through it) cannot write the host's directory.
func TestCLIRunReadonlyRootIsReadOnlyOnTheHost(t *testing.T) {
	bin, cfg, stateRoot := kilnCLI(t)
	dir := t.TempDir()
	// Linux 6.1 gives a second mount of the tag the newest of its submounts' file systems, here the root's; the
	// share's own root would hold it at <id>/rootfs.
	spec := testbundle.Spec("sh", "-c", "mkdir /dev/shm/s && mount -t virtiofs "+agentv1.SharedFSTag+" /dev/shm/s && "+
		"cd /dev/shm/s && { [ -d bin ] || cd */rootfs; } && [ -d bin ] && "+
		"if touch hostile 2>/dev/null; then echo wrote; else echo refused; fi")
	caps := append(testbundle.DefaultCaps(), "CAP_SYS_ADMIN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH")
	spec.Process.Capabilities = &specs.LinuxCapabilities{Bounding: caps, Effective: caps, Permitted: caps}
	if err := testbundle.Write(dir, spec); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "--config", cfg, "run", "--bundle", dir, "rohost")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil || stdout.String() != "refused\n" {
		t.Errorf("kiln run: %v, stdout %q (want \"refused\"); stderr:\n%s", err, stdout.String(), stderr.String())
	}
	if _, err := os.Lstat(filepath.Join(dir, "rootfs", "hostile")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the guest wrote the read-only root's host directory: %v", err)
	}
	checkRunLeftovers(t, stateRoot)
}
