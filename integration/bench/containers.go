package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"slices"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/kiln-runtime/kiln/config"
	"github.com/kiln-runtime/kiln/integration/testbundle"
	"github.com/kiln-runtime/kiln/runtime/bundle"
	"github.com/kiln-runtime/kiln/runtime/pod"
	"github.com/kiln-runtime/kiln/runtime/stdio"
	"github.com/kiln-runtime/kiln/vm/qemu"
)

// throughputBytes is what each throughput run writes to stdout: 1600 blocks of 64 KiB, 100 MiB.
const throughputBytes = 1600 * 64 << 10

// throughputArgs write throughputBytes of zeros to stdout.
func throughputArgs() []string {
	return []string{"dd", "if=/dev/zero", "bs=65536", "count=1600"}
}

// containerResult is one runtime's figures.
type containerResult struct {
	execLatency time.Duration // median exec round trip of `true`
	mbPerSec    float64       // median stdout throughput
}

// countingWriter counts what it is given.
type countingWriter struct{ n int64 }

func (w *countingWriter) Write(p []byte) (int, error) {
	w.n += int64(len(p))
	return len(p), nil
}

// containerBench runs the same busybox bundle with runc and in a Kiln guest and prints exec latency and stdout
// throughput side by side.
func containerBench(ctx context.Context, base qemu.Config, initrd, tools, work string, runs int) error {
	bundle := filepath.Join(work, "bundle")
	spec := testbundle.Spec("sleep", "1000000")
	if err := testbundle.Write(bundle, spec); err != nil {
		return err
	}
	thrRuns := max(3, runs/3)

	runcBin, err := ensureRunc(ctx, tools)
	if err != nil {
		return err
	}
	rr, err := runcBench(ctx, runcBin, work, bundle, runs, thrRuns)
	if err != nil {
		return err
	}
	kr, err := kilnBench(ctx, base, initrd, bundle, spec, runs, thrRuns)
	if err != nil {
		return err
	}
	fmt.Println()
	fmt.Printf("%-40s %10s %10s %10s\n", "containers (busybox bundle)", "kiln", "runc", "kiln/runc")
	fmt.Printf("%-40s %10.1f %10.1f %10.2f\n", fmt.Sprintf("exec round trip, ms (median of %d)", runs),
		ms(kr.execLatency), ms(rr.execLatency), float64(kr.execLatency)/float64(rr.execLatency))
	fmt.Printf("%-40s %10.1f %10.1f %10.2f\n", fmt.Sprintf("stdout throughput, MB/s (median of %d)", thrRuns),
		kr.mbPerSec, rr.mbPerSec, kr.mbPerSec/rr.mbPerSec)
	return nil
}

func runcBench(ctx context.Context, bin, work, bundle string, runs, thrRuns int) (res containerResult, retErr error) {
	r, err := startRunc(ctx, bin, work, bundle, "kiln-bench")
	if err != nil {
		return res, err
	}
	defer func() { retErr = errors.Join(retErr, r.delete()) }()
	var lat []time.Duration
	for range runs {
		d, err := r.exec(ctx, io.Discard, "true")
		if err != nil {
			return res, err
		}
		lat = append(lat, d)
	}
	var rates []float64
	for range thrRuns {
		var w countingWriter
		d, err := r.exec(ctx, &w, throughputArgs()...)
		if err != nil {
			return res, err
		}
		if w.n != throughputBytes {
			return res, fmt.Errorf("runc exec dd wrote %d bytes, want %d", w.n, throughputBytes)
		}
		rates = append(rates, float64(w.n)/d.Seconds()/1e6)
	}
	return containerResult{execLatency: median(lat), mbPerSec: medianFloat(rates)}, nil
}

func kilnBench(ctx context.Context, base qemu.Config, initrd, bundleDir string, spec *specs.Spec, runs, thrRuns int) (res containerResult, retErr error) {
	cfg := config.Default()
	cfg.Runtime.StateDir = base.StateRoot
	cfg.Hypervisor.Kernel, cfg.Hypervisor.Initrd = base.Kernel, initrd
	cfg.Hypervisor.VCPUs, cfg.Hypervisor.MemoryMiB = base.VCPUs, base.MemoryMiB
	p, err := pod.New(ctx, pod.Options{ID: "kiln-containers", Config: cfg, Log: base.Log})
	if err != nil {
		return res, err
	}
	defer func() { retErr = errors.Join(retErr, p.Close(context.WithoutCancel(ctx))) }()
	b, err := bundle.Load(bundleDir)
	if err != nil {
		return res, err
	}
	b.Spec = spec
	c, err := p.CreateContainer(ctx, pod.ContainerOptions{ID: "bench", Bundle: b})
	if err != nil {
		return res, err
	}
	defer func() {
		_, err := p.DeleteContainer(context.WithoutCancel(ctx), c, true)
		retErr = errors.Join(retErr, err)
	}()
	if err := c.Start(ctx); err != nil {
		return res, err
	}
	n := 0
	execOnce := func(w io.Writer, args ...string) (time.Duration, error) {
		n++
		execID := fmt.Sprintf("b%d", n)
		proc := *testbundle.Spec(args...).Process
		start := time.Now()
		// Like `runc exec`, the process gets stdout and stderr attached.
		p, err := c.Exec(ctx, execID, &proc, stdio.IO{Stdout: w, Stderr: io.Discard})
		if err != nil {
			return 0, err
		}
		e, err := p.Wait(ctx)
		d := time.Since(start)
		if err != nil {
			return 0, err
		}
		if _, err := c.DeleteProcess(ctx, execID); err != nil {
			return 0, err
		}
		if e.Status != 0 {
			return 0, fmt.Errorf("kiln exec %v: exit status %d", args, e.Status)
		}
		return d, nil
	}
	var lat []time.Duration
	for range runs {
		d, err := execOnce(io.Discard, "true")
		if err != nil {
			return res, err
		}
		lat = append(lat, d)
	}
	var rates []float64
	for range thrRuns {
		var w countingWriter
		d, err := execOnce(&w, throughputArgs()...)
		if err != nil {
			return res, err
		}
		if w.n != throughputBytes {
			return res, fmt.Errorf("kiln exec dd wrote %d bytes, want %d", w.n, throughputBytes)
		}
		rates = append(rates, float64(w.n)/d.Seconds()/1e6)
	}
	return containerResult{execLatency: median(lat), mbPerSec: medianFloat(rates)}, nil
}

func medianFloat(xs []float64) float64 {
	s := slices.Clone(xs)
	slices.Sort(s)
	return s[len(s)/2]
}
