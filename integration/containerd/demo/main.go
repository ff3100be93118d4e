// Command demo is `make demo`: it builds the pinned containerd, ctr and runc when missing, starts a private
// containerd (root, state, sockets and Kiln's VM state in one temporary directory; a system containerd is never
// touched), imports a busybox image built from Debian's busybox-static, runs
// `ctr run --runtime io.containerd.kiln.v2 --rm … uname -r`, prints the guest's kernel release beside the host's,
// and stops everything.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/kiln-runtime/kiln/integration/containerd"
)

func main() {
	repo := flag.String("repo", ".", "Kiln source tree (for the runc tools module)")
	tools := flag.String("tools", "_output/tools/bin", "where containerd, ctr and runc are built and cached")
	bin := flag.String("bin", "_output/bin", "directory holding containerd-shim-kiln-v2")
	share := flag.String("share", "_output/share/kiln", "guest kernel and initramfs")
	flag.Parse()
	if err := run(context.Background(), *repo, *tools, *bin, *share); err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(1)
	}
}

func abs(p string) string {
	a, err := filepath.Abs(p)
	if err != nil {
		return p
	}
	return a
}

func step(format string, args ...any) { fmt.Printf("==> "+format+"\n", args...) }

func run(ctx context.Context, repo, tools, bin, share string) (retErr error) {
	repo, tools, bin, share = abs(repo), abs(tools), abs(bin), abs(share)
	if _, err := os.Stat(filepath.Join(bin, containerd.ShimBinary)); err != nil {
		return fmt.Errorf("%w: run `make build`", err)
	}
	step("containerd %s, ctr and runc %s in %s (built once, ~70 s)", containerd.ContainerdVersion, containerd.RuncVersion, tools)
	t, err := containerd.EnsureTools(ctx, repo, tools)
	if err != nil {
		return err
	}
	step("starting a private containerd")
	d, err := containerd.Start(ctx, containerd.Options{Tools: t, Path: []string{bin}})
	if err != nil {
		return err
	}
	fmt.Printf("    socket %s, log %s\n", d.Address, d.LogPath)
	defer func() {
		step("stopping containerd and removing %s", d.Dir)
		if err := d.Stop(context.WithoutCancel(ctx)); err != nil {
			retErr = errors.Join(retErr, err)
		}
	}()
	step("importing %s built from Debian's busybox-static", containerd.BusyboxRef)
	if err := d.ImportBusybox(ctx); err != nil {
		return err
	}
	cfg, err := d.KilnConfig(share, "")
	if err != nil {
		return err
	}
	args := append([]string{"run"}, containerd.KilnRunArgs(cfg)...)
	args = append(args, "--rm", containerd.BusyboxRef, "kiln-demo", "uname", "-r")
	step("ctr %s", strings.Join(args, " "))
	start := time.Now()
	out, err := d.Ctr(ctx, args...)
	if err != nil {
		return fmt.Errorf("%w\ncontainerd log:\n%s", err, d.LogTail(30))
	}
	took := time.Since(start)
	host, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	fmt.Printf("\nguest kernel release: %s\n", strings.TrimSpace(out))
	fmt.Printf("host kernel release:  %s\n", strings.TrimSpace(string(host)))
	fmt.Printf("ctr run --rm took %s (one microVM booted, ran the container, and stopped)\n\n", took.Round(time.Millisecond))
	if want, err := containerd.GuestKernelRelease(share); err == nil && strings.TrimSpace(out) != want {
		return fmt.Errorf("the container reported kernel %q, the guest image has %q", strings.TrimSpace(out), want)
	}
	if pids := d.WaitShimsGone(ctx, 20*time.Second); len(pids) > 0 {
		return fmt.Errorf("shims still running: %v", pids)
	}
	return nil
}
