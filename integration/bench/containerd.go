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
	// Spares off in this loop (spareLatency measures them): its back-to-back runs would take a spare at times.
	fast, err := d.KilnConfig(share, fmt.Sprintf("[hypervisor]\ntemplate_dir = %q\nspare = false\n", templates))
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
	fmt.Printf("%-40s %10.1f %10.2f\n", "kiln, spare = false (VM from template)", ms(km), float64(km)/float64(rm))
	fmt.Printf("%-40s %10.1f %10.2f\n", "kiln, fast_start = \"off\" (VM boots)", ms(cm), float64(cm)/float64(rm))
	return spareLatency(ctx, d, share, templates, runs, once)
}

// spareLatency measures `ctr run` with spare shims (hypervisor.spare) beside runc, in a loop of its own: a task of
// another Kiln configuration would find the spare and stop it. Each timed run first waits (up to a minute) for the
// spare to be ready, as on a host whose starts are not back to back; the spare goes with d (Daemon.Stop).
func spareLatency(ctx context.Context, d *containerd.Daemon, share, templates string, runs int,
	once func(name string, runtime []string) (time.Duration, error)) error {
	cfg := filepath.Join(d.Dir, "kiln-spare.toml")
	if err := containerd.WriteKilnConfig(cfg, share, d.StateDir(), fmt.Sprintf("[hypervisor]\ntemplate_dir = %q\nspare = true\n", templates)); err != nil {
		return err
	}
	args := containerd.KilnRunArgs(cfg)
	// Not counted: it starts the first spare.
	if _, err := once("bench-warm-spare", args); err != nil {
		return err
	}
	var kiln, runc []time.Duration
	var found int
	for i := range runs {
		// runc too runs with the spare waiting, not booting beside it.
		ready := containerd.WaitSpare(d.Address, time.Minute)
		dr, err := once(fmt.Sprintf("bench-spare-runc-%d", i), nil)
		if err != nil {
			return err
		}
		if ready {
			found++
		}
		dk, err := once(fmt.Sprintf("bench-spare-%d", i), args)
		if err != nil {
			return err
		}
		kiln, runc = append(kiln, dk), append(runc, dr)
	}
	km, rm := median(kiln), median(runc)
	fmt.Printf("%-40s %10.1f %10.2f   (target <= 4; runc %.1f ms in the same loop; a ready spare before %d of %d runs)\n",
		"kiln, default (a ready spare shim)", ms(km), float64(km)/float64(rm), ms(rm), found, runs)
	if err := variedLatency(ctx, d, cfg, "kiln, default, tasks of varied limits", runs, once); err != nil {
		return err
	}
	fixed := filepath.Join(d.Dir, "kiln-fixed.toml")
	if err := containerd.WriteKilnConfig(fixed, share, d.StateDir(), fmt.Sprintf("[hypervisor]\ntemplate_dir = %q\nspare = true\nmemory_max_mib = 0\nvcpus_max = 0\n", templates)); err != nil {
		return err
	}
	return variedLatency(ctx, d, fixed, "  the same, VMs that do not grow", runs, once)
}

// variedLatency measures `ctr run` of tasks whose memory and CPU limits change from one run to the next (64 to
// 256 MiB, no CPU limit or one CPU), as a Kubernetes host's pods' do, with Kiln configuration cfg (spares on)
// beside runc given the same limits: a VM that grows serves each from the spare the one before left, a VM that
// does not declines it.
func variedLatency(ctx context.Context, d *containerd.Daemon, cfg, name string, runs int,
	once func(name string, runtime []string) (time.Duration, error)) error {
	limits := func(i int) []string {
		l := []string{"--memory-limit", fmt.Sprint((64 << 20) * (1 + i%4))}
		if i%2 == 1 {
			l = append(l, "--cpus", "1")
		}
		return l
	}
	base := filepath.Base(cfg)
	if _, err := once("bench-warm-"+base, append(containerd.KilnRunArgs(cfg), limits(runs)...)); err != nil {
		return err
	}
	var kiln, runc []time.Duration
	var found int
	for i := range runs {
		ready := containerd.WaitSpare(d.Address, time.Minute)
		dr, err := once(fmt.Sprintf("bench-varied-runc-%s-%d", base, i), limits(i))
		if err != nil {
			return err
		}
		if ready {
			found++
		}
		dk, err := once(fmt.Sprintf("bench-varied-%s-%d", base, i), append(containerd.KilnRunArgs(cfg), limits(i)...))
		if err != nil {
			return err
		}
		kiln, runc = append(kiln, dk), append(runc, dr)
	}
	km, rm := median(kiln), median(runc)
	fmt.Printf("%-40s %10.1f %10.2f   (runc %.1f ms in the same loop; a ready spare before %d of %d runs)\n",
		name, ms(km), float64(km)/float64(rm), ms(rm), found, runs)
	return nil
}
