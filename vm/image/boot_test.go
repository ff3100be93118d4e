package image

import (
	"bufio"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestBootFloor boots the kernel `make image` installed with the floor init under QEMU TCG and
// expects QEMU to exit by itself, which only happens if the kernel unpacked
// the initramfs, ran /init and honoured its reset (QEMU runs with -no-reboot). Opt in with
// KILN_IMAGE_BOOT=1: it needs qemu-system-x86_64 and takes seconds.
func TestBootFloor(t *testing.T) {
	if os.Getenv("KILN_IMAGE_BOOT") != "1" {
		t.Skip("set KILN_IMAGE_BOOT=1 to boot the image under QEMU")
	}
	qemu, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		t.Skip("no qemu-system-x86_64")
	}
	kernel, release := builtKernel(t)
	dir := t.TempDir()
	floor := filepath.Join(dir, "floorinit")
	build := exec.Command("go", "build", "-o", floor, "./floorinit")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build floorinit: %v\n%s", err, out)
	}
	for _, c := range []Compression{CompressNone, CompressGzip} {
		t.Run(string(c), func(t *testing.T) {
			out := filepath.Join(dir, string(c))
			res, err := Build(context.Background(), Options{
				KernelImage: kernel, KernelRelease: release, OutDir: out, InitPath: floor, Compression: c,
			})
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			// reboot=t, as vm/qemu boots guests: a microvm has no ACPI reset register to try first.
			appendLine := "console=ttyS0 tsc=reliable panic=-1 reboot=t quiet"
			if khz := hostTSCkHz(); khz > 0 {
				// Spares the guest calibrating the TSC against the emulated
				// PIT, which fails and hangs the boot when the host is busy.
				appendLine += " tsc_early_khz=" + strconv.Itoa(khz)
			}
			start := time.Now()
			cmd := exec.CommandContext(ctx, qemu, "-M", "microvm,acpi=off,pit=on,pic=on,rtc=on", "-accel", "tcg", "-m", "256",
				"-nodefaults", "-no-user-config", "-nographic", "-no-reboot", "-serial", "stdio",
				"-kernel", res.Vmlinuz, "-initrd", res.Initrd, "-append", appendLine)
			console, err := cmd.CombinedOutput()
			if err != nil {
				t.Fatalf("qemu: %v (timeout means the floor init never reset the guest)\n%s", err, console)
			}
			if !strings.Contains(string(console), "reboot: Restarting system") {
				t.Fatalf("guest did not reset:\n%s", console)
			}
			t.Logf("%s initrd %d bytes: QEMU exited after %v", c, res.InitrdSize, time.Since(start).Round(time.Millisecond))
		})
	}
}

// builtKernel returns the kernel `make image` installed under the repository's _output/share/kiln and its
// release, skipping the test when there is none.
func builtKernel(t *testing.T) (kernel, release string) {
	t.Helper()
	share, err := filepath.Abs("../../_output/share/kiln")
	if err != nil {
		t.Fatal(err)
	}
	rel, err := os.ReadFile(filepath.Join(share, KernelReleaseName))
	if err != nil {
		t.Skipf("no guest kernel (%v): run make image", err)
	}
	return filepath.Join(share, VmlinuzName), strings.TrimSpace(string(rel))
}

// hostTSCkHz estimates the host TSC frequency from /proc/cpuinfo; under TCG
// the guest reads the host's TSC, so this is the guest's too.
func hostTSCkHz() int {
	f, err := os.Open("/proc/cpuinfo")
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), ":"); ok && strings.TrimSpace(k) == "cpu MHz" {
			mhz, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
			if err != nil {
				return 0
			}
			return int(mhz * 1000)
		}
	}
	return 0
}
