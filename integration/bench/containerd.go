package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/kiln-runtime/kiln/integration/containerd"
)

// containerdLatency measures `ctr run --rm busybox true` through one private containerd, Kiln and runc
// interleaved (so drift in machine load hits both alike), and prints the medians and their ratio. share is the
// guest image directory (_output/share/kiln); the shim is taken from the bin directory beside it and the pinned
// containerd, ctr and runc are built into tools when missing.
func containerdLatency(ctx context.Context, share, tools string, runs int) (retErr error) {
	repo, err := os.Getwd()
	if err != nil {
		return err
	}
	share, _ = filepath.Abs(share)
	tools, _ = filepath.Abs(tools)
	bin := filepath.Join(share, "..", "..", "bin")
	t, err := containerd.EnsureTools(ctx, repo, tools)
	if err != nil {
		return err
	}
	d, err := containerd.Start(ctx, containerd.Options{Tools: t, Path: []string{bin}})
	if err != nil {
		return err
	}
	defer func() {
		if err := d.Stop(context.WithoutCancel(ctx)); err != nil {
			retErr = errors.Join(retErr, err)
		}
	}()
	if err := d.ImportBusybox(ctx); err != nil {
		return err
	}
	cfg, err := d.KilnConfig(share, "")
	if err != nil {
		return err
	}
	once := func(name string, runtime []string) (time.Duration, error) {
		args := append(append([]string{"run", "--rm"}, runtime...), containerd.BusyboxRef, name, "true")
		start := time.Now()
		if _, err := d.Ctr(ctx, args...); err != nil {
			return 0, err
		}
		return time.Since(start), nil
	}
	var kiln, runc []time.Duration
	for i := range runs {
		dr, err := once(fmt.Sprintf("bench-runc-%d", i), nil)
		if err != nil {
			return err
		}
		runc = append(runc, dr)
		dk, err := once(fmt.Sprintf("bench-kiln-%d", i), containerd.KilnRunArgs(cfg))
		if err != nil {
			return err
		}
		kiln = append(kiln, dk)
	}
	rm, km := median(runc), median(kiln)
	fmt.Printf("%-40s %10s %10s\n", "ctr run --rm busybox true (median of "+fmt.Sprint(runs)+")", "ms", "ratio")
	fmt.Printf("%-40s %10.1f %10s\n", "runc "+containerd.RuncVersion+" (containerd "+containerd.ContainerdVersion+")", ms(rm), "1.00")
	fmt.Printf("%-40s %10.1f %10.2f   (target <= 4)\n", "kiln (one microVM per container)", ms(km), float64(km)/float64(rm))
	return nil
}
