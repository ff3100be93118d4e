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

// containerdLatency measures `ctr run --rm busybox true` through one private containerd: runc, Kiln with its
// default fast start (VM templates in templates) and Kiln with fast_start = "off", interleaved (so drift in machine
// load hits all alike), and prints the medians and their ratios to runc's. share is the guest image directory
// (_output/share/kiln); the shim is taken from the bin directory beside it and the pinned containerd, ctr and runc
// are built into tools when missing. A first run of each Kiln configuration, not counted, builds the template
// (once per host and guest shape).
func containerdLatency(ctx context.Context, share, tools, templates string, runs int) (retErr error) {
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
	fast, err := d.KilnConfig(share, fmt.Sprintf("[hypervisor]\ntemplate_dir = %q\n", templates))
	if err != nil {
		return err
	}
	cold := filepath.Join(d.Dir, "kiln-cold.toml")
	if err := containerd.WriteKilnConfig(cold, share, d.StateDir(), "[hypervisor]\nfast_start = \"off\"\n"); err != nil {
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
	configs := []struct {
		name string
		args []string
	}{
		{"runc", nil},
		{"kiln", containerd.KilnRunArgs(fast)},
		{"kiln-cold", containerd.KilnRunArgs(cold)},
	}
	for _, c := range configs[1:] {
		if _, err := once("bench-warm-"+c.name, c.args); err != nil {
			return err
		}
	}
	took := map[string][]time.Duration{}
	for i := range runs {
		for _, c := range configs {
			dr, err := once(fmt.Sprintf("bench-%s-%d", c.name, i), c.args)
			if err != nil {
				return err
			}
			took[c.name] = append(took[c.name], dr)
		}
	}
	rm, km, cm := median(took["runc"]), median(took["kiln"]), median(took["kiln-cold"])
	fmt.Printf("%-40s %10s %10s\n", "ctr run --rm busybox true (median of "+fmt.Sprint(runs)+")", "ms", "ratio")
	fmt.Printf("%-40s %10.1f %10s\n", "runc "+containerd.RuncVersion+" (containerd "+containerd.ContainerdVersion+")", ms(rm), "1.00")
	fmt.Printf("%-40s %10.1f %10.2f   (target <= 4)\n", "kiln (VM from its template, the default)", ms(km), float64(km)/float64(rm))
	fmt.Printf("%-40s %10.1f %10.2f\n", "kiln, fast_start = \"off\" (VM boots)", ms(cm), float64(cm)/float64(rm))
	return nil
}
