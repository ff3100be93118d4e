// Command bench measures Kiln against baselines run in the same invocation and prints ratios (`make bench`).
// Boot: QEMU start to agent ready, beside the floor: the same QEMU machine and kernel with an initramfs whose
// init powers off at once (QEMU start to QEMU exit).
// Containers: exec round-trip latency and stdout throughput in a Kiln guest, beside runc (built from source under
// the tools directory) running the same busybox bundle on the host.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/kiln-runtime/kiln/config"
	"github.com/kiln-runtime/kiln/runtime/sandbox"
	"github.com/kiln-runtime/kiln/vm/accel"
	"github.com/kiln-runtime/kiln/vm/qemu"
)

func main() {
	share := flag.String("share", "_output/share/kiln", "guest image directory")
	tools := flag.String("tools", "_output/tools/bin", "directory holding kiln-image (and runc, built there when missing)")
	runs := flag.Int("runs", 10, "runs per measurement")
	pods := flag.Bool("pods", true, "measure pods through containerd's CRI plugin too")
	parallel := flag.Int("parallel", 10, "pods started at once")
	podsOnly := flag.Bool("pods-only", false, "measure only pods")
	poolOnly := flag.Bool("pool-only", false, "measure only a burst of -parallel pods from a pool of as many spares (hypervisor.spare_pool)")
	fastStart := flag.String("pods-fast-start", "template", "hypervisor.fast_start of the pods' Kiln (\"off\" for a baseline of cold boots)")
	podsHypervisor := flag.String("pods-hypervisor", "", "more keys of the pods' Kiln [hypervisor] table, as TOML lines (to measure a setting, e.g. 'vcpus = 1')")
	flag.Parse()
	podsCfg := podsConfig{fastStart: *fastStart, hypervisor: *podsHypervisor, poolOnly: *poolOnly}
	if err := run(context.Background(), *share, *tools, *runs, *pods, *podsOnly || *poolOnly, *parallel, podsCfg); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, share, tools string, runs int, pods, podsOnly bool, parallel int, podsCfg podsConfig) error {
	logrus.SetLevel(logrus.WarnLevel)
	// Every figure here is wall time on a shared machine: say how busy it was, so sittings can be compared.
	loadBefore := hostLoad()
	defer func() { fmt.Printf("host load average (1, 5, 15 min): %s before, %s after\n", loadBefore, hostLoad()) }()
	var err error
	if share, err = filepath.Abs(share); err != nil {
		return err
	}
	if tools, err = filepath.Abs(tools); err != nil {
		return err
	}
	if podsOnly {
		repo, err := repoRoot()
		if err != nil {
			return err
		}
		templates, cleanup, err := templateDir()
		if err != nil {
			return err
		}
		defer cleanup()
		return podBench(ctx, repo, share, tools, templates, podsCfg, runs, parallel)
	}
	work, err := os.MkdirTemp("", "kiln-bench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(work)
	floorInitrd, err := buildFloor(ctx, work, share, tools)
	if err != nil {
		return err
	}
	choice, err := accel.DefaultHost().Detect("auto")
	if err != nil {
		return err
	}
	kernel := filepath.Join(share, "vmlinuz")
	initrd := filepath.Join(share, "initrd.img")
	// The machine Kiln boots by default, for both (its vCPUs and RAM to grow into, the guest booting with the
	// configuration's): the floor is the same machine with nothing of Kiln's inside.
	size := config.Default().Hypervisor
	bootMiB, ramMiB := size.MemoryLayout()
	vcpus, maxVCPUs := size.CPULayout()
	base := qemu.Config{
		StateRoot: filepath.Join(work, "state"), QEMU: "qemu-system-x86_64", Accel: choice.Kind,
		VCPUs: vcpus, MaxVCPUs: maxVCPUs, MemoryMiB: bootMiB, MaxMemoryMiB: ramMiB, Kernel: kernel, StopTimeout: 3 * time.Second,
		Log: logrus.NewEntry(logrus.StandardLogger()),
	}

	var floor, ready []time.Duration
	// Interleave the two so that drift in machine load affects both alike.
	for i := range runs {
		d, err := floorRun(ctx, base, fmt.Sprintf("floor-%d", i), floorInitrd)
		if err != nil {
			return err
		}
		floor = append(floor, d)
		d, err = agentRun(ctx, base, fmt.Sprintf("kiln-%d", i), initrd)
		if err != nil {
			return err
		}
		ready = append(ready, d)
	}
	fm, km := median(floor), median(ready)
	fmt.Printf("accelerator: %s\n", choice.Kind)
	fmt.Printf("%-40s %10s %10s\n", "measurement (median of "+fmt.Sprint(runs)+")", "ms", "ratio")
	fmt.Printf("%-40s %10.1f %10s\n", "floor: QEMU start to power-off", ms(fm), "1.00")
	fmt.Printf("%-40s %10.1f %10.2f   (target <= 1.1)\n", "kiln: QEMU start to agent ready", ms(km), float64(km)/float64(fm))
	for _, f := range []struct{ name, path string }{{"initramfs (kiln)", initrd}, {"initramfs (floor)", floorInitrd}} {
		st, err := os.Stat(f.path)
		if err != nil {
			return err
		}
		fmt.Printf("%-40s %10d bytes\n", f.name, st.Size())
	}
	if err := containerBench(ctx, base, initrd, tools, work, runs); err != nil {
		return err
	}
	templates, cleanup, err := templateDir()
	if err != nil {
		return err
	}
	defer cleanup()
	if err := containerdLatency(ctx, share, tools, templates, runs); err != nil {
		return err
	}
	if !pods {
		return nil
	}
	repo, err := repoRoot()
	if err != nil {
		return err
	}
	return podBench(ctx, repo, share, tools, templates, podsCfg, runs, parallel)
}

// templateDir makes the bench's own VM template directory on tmpfs, so that its files are the bench's alone
// (podMemory counts them) and go with it.
func templateDir() (string, func(), error) {
	top, err := os.MkdirTemp("/dev/shm", "kiln-bench-")
	if err != nil {
		return "", nil, err
	}
	// QEMU may run as another user: it must reach its RAM copy.
	if err := os.Chmod(top, 0o711); err != nil {
		_ = os.RemoveAll(top)
		return "", nil, err
	}
	return filepath.Join(top, "templates"), func() { _ = os.RemoveAll(top) }, nil
}

// buildStatic builds the Go package pkg (a path relative to the repository) as a static binary at out.
func buildStatic(ctx context.Context, pkg, out string) error {
	build := exec.CommandContext(ctx, "go", "build", "-trimpath", "-o", out, pkg)
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := build.CombinedOutput(); err != nil {
		return fmt.Errorf("build %s: %v\n%s", pkg, err, b)
	}
	return nil
}

func buildFloor(ctx context.Context, work, share, tools string) (string, error) {
	bin := filepath.Join(work, "floorinit")
	if err := buildStatic(ctx, "./vm/image/floorinit", bin); err != nil {
		return "", err
	}
	initrd := filepath.Join(work, "floor-initrd.img")
	release, err := os.ReadFile(filepath.Join(share, "kernel-release"))
	if err != nil {
		return "", err
	}
	img := exec.CommandContext(ctx, filepath.Join(tools, "kiln-image"), "-q", "--init", bin,
		"--out", filepath.Join(work, "floor-share"), "--initrd", initrd,
		"--kernel", filepath.Join(share, "vmlinuz"), "--kernel-release", strings.TrimSpace(string(release)))
	if out, err := img.CombinedOutput(); err != nil {
		return "", fmt.Errorf("build floor initramfs: %v\n%s", err, out)
	}
	return initrd, nil
}

func floorRun(ctx context.Context, base qemu.Config, id, initrd string) (time.Duration, error) {
	cfg := base
	cfg.ID, cfg.Initrd = id, initrd
	m, err := qemu.New(cfg)
	if err != nil {
		return 0, err
	}
	start := time.Now()
	if err := m.Start(ctx); err != nil {
		return 0, err
	}
	select {
	case <-m.Exited():
	case <-time.After(60 * time.Second):
		_ = m.Stop(ctx)
		return 0, fmt.Errorf("floor guest did not power off within 60s%s", m.Diagnostics())
	}
	d := time.Since(start)
	return d, m.Wait(ctx)
}

func agentRun(ctx context.Context, base qemu.Config, id, initrd string) (time.Duration, error) {
	cfg := base
	cfg.ID, cfg.Initrd = id, initrd
	m, err := qemu.New(cfg)
	if err != nil {
		return 0, err
	}
	start := time.Now()
	sb, err := sandbox.Start(ctx, m, sandbox.Options{})
	if err != nil {
		return 0, err
	}
	d := time.Since(start)
	return d, sb.Stop(ctx)
}

// hostLoad is the host's load average line (1, 5 and 15 minutes), or "unknown".
func hostLoad() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "unknown"
	}
	return strings.Join(f[:3], " ")
}

func median(ds []time.Duration) time.Duration {
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[len(s)/2]
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
