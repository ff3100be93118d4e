package containerd

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kiln-runtime/kiln/integration/testbundle"
)

// The configuration named by containerd's runtime option ConfigPath (ctr --runtime-config-path) is the one the
// shim uses: its VM size, which differs from the defaults, shows inside the container.
func TestConfigPathFromRuntimeOptions(t *testing.T) {
	k := startKiln(t)
	cfg := filepath.Join(t.TempDir(), "sized.toml")
	body := fmt.Sprintf("[hypervisor]\nkernel = %q\ninitrd = %q\nvcpus = 1\nmemory_mib = 384\n[runtime]\nstate_dir = %q\n",
		filepath.Join(k.assets, "vmlinuz"), filepath.Join(k.assets, "initrd.img"), k.d.StateDir())
	if err := os.WriteFile(cfg, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	k.cfg = cfg
	out, errOut, code := k.run(t, "--rm", BusyboxRef, "kiln-sized", "sh", "-c", "nproc; grep MemTotal /proc/meminfo")
	if code != 0 {
		t.Fatalf("exit %d, stderr %q", code, errOut)
	}
	fields := strings.Fields(out)
	if len(fields) < 3 || fields[0] != "1" {
		t.Fatalf("output %q: want 1 vCPU from %s", out, cfg)
	}
	kb, err := strconv.Atoi(fields[2])
	if err != nil || kb < 300<<10 || kb > 384<<10 {
		t.Fatalf("MemTotal %q kB: want a guest of 384 MiB from %s", fields[2], cfg)
	}
}

// An install into a temporary prefix runs a container through containerd with only the installed files: the
// installed shim on containerd's PATH, and the guest image it finds next to itself.
func TestInstalledKilnRunsContainers(t *testing.T) {
	RequireRoot(t, "containerd")
	root := RepoRoot(t)
	// Readable by everyone, as /usr/local is: QEMU must reach the installed guest kernel and initrd.
	prefix := testbundle.PublicDir(t)
	install := exec.Command("make", "install", "PREFIX="+prefix)
	install.Dir = root
	if out, err := install.CombinedOutput(); err != nil {
		t.Fatalf("make install: %v\n%s", err, out)
	}
	d := startDaemon(t, Options{Path: []string{filepath.Join(prefix, "bin")}})
	t.Cleanup(func() { checkNoLeftovers(t, d) })
	// The configuration names no guest assets: the shim must find the installed ones.
	cfg := filepath.Join(t.TempDir(), "kiln.toml")
	if err := os.WriteFile(cfg, []byte(fmt.Sprintf("[runtime]\nstate_dir = %q\n", d.StateDir())), 0o644); err != nil {
		t.Fatal(err)
	}
	share := filepath.Join(prefix, "share", "kiln")
	var sawInstalledKernel atomic.Bool
	stop := make(chan struct{})
	go func() {
		for {
			select {
			case <-stop:
				return
			case <-time.After(50 * time.Millisecond):
			}
			if qemuWithAssets(filepath.Join(share, "vmlinuz"), filepath.Join(share, "initrd.img")) {
				sawInstalledKernel.Store(true)
			}
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	args := append([]string{"run", "--rm"}, KilnRunArgs(cfg)...)
	args = append(args, BusyboxRef, "kiln-installed", "sh", "-c", "sleep 2; uname -r")
	out, err := d.Ctr(ctx, args...)
	close(stop)
	if err != nil {
		t.Fatal(err)
	}
	want, err := GuestKernelRelease(share)
	if err != nil {
		t.Fatal(err)
	}
	if strings.TrimSpace(out) != want {
		t.Fatalf("guest kernel %q, want %q", out, want)
	}
	if !sawInstalledKernel.Load() {
		t.Fatalf("no QEMU ran with the installed kernel and initramfs from %s", share)
	}
}

// qemuWithAssets reports whether a running QEMU boots this kernel and exactly this initramfs. A VM that may grow
// boots a copy of the kernel in a memfd (qemu.bootKernel; a clone a stub of it), which QEMU names by its
// descriptor and which is emptied once read: the guest's `uname -r` tells its kernel.
func qemuWithAssets(kernel, initrd string) bool {
	matches, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, f := range matches {
		b, err := os.ReadFile(f)
		if err != nil || !bytes.Contains(b, []byte("-initrd\x00"+initrd+"\x00")) {
			continue
		}
		if bytes.Contains(b, []byte("-kernel\x00"+kernel+"\x00")) {
			return true
		}
		args := strings.Split(string(b), "\x00")
		for i, a := range args[:len(args)-1] {
			fd, ok := strings.CutPrefix(args[i+1], "/proc/self/fd/")
			if a != "-kernel" || !ok {
				continue
			}
			if link, err := os.Readlink(filepath.Join(filepath.Dir(f), "fd", fd)); err == nil && strings.HasPrefix(link, "/memfd:kiln-kernel") {
				return true
			}
		}
	}
	return false
}
