package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"slices"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	agentstdio "github.com/kiln-runtime/kiln/agent/stdio"
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

// execFunc runs args in a runtime's benchmark container with stdout going to w and returns how long the exec
// took, from the request to the process's exit with all its output delivered.
type execFunc func(w io.Writer, args ...string) (time.Duration, error)

// containerBench runs the same busybox bundle with runc and in a Kiln guest and prints exec latency and stdout
// throughput side by side. Both containers run for the whole measurement and their samples are interleaved, as
// the boot and ctr measurements are, so that drift in machine load affects both runtimes alike instead of
// landing on whichever ran second.
func containerBench(ctx context.Context, base qemu.Config, initrd, tools, work string, runs int) (retErr error) {
	bundle := filepath.Join(work, "bundle")
	spec := testbundle.Spec("sleep", "1000000")
	if err := testbundle.Write(bundle, spec); err != nil {
		return err
	}
	if err := buildStatic(ctx, "./integration/bench/vsockwrite", filepath.Join(bundle, "rootfs", "vsockwrite")); err != nil {
		return err
	}
	thrRuns := max(3, runs/3)

	runcBin, err := ensureRunc(ctx, tools)
	if err != nil {
		return err
	}
	r, err := startRunc(ctx, runcBin, work, bundle, "kiln-bench")
	if err != nil {
		return err
	}
	defer func() { retErr = errors.Join(retErr, r.delete()) }()
	kilnExec, vsockPath, translation, stopKiln, err := startKiln(ctx, base, initrd, bundle, spec)
	if err != nil {
		return err
	}
	defer func() { retErr = errors.Join(retErr, stopKiln()) }()
	started, tcg, err := translated(ctx, translation)
	if err != nil {
		return err
	}
	runcExec := func(w io.Writer, args ...string) (time.Duration, error) { return r.exec(ctx, w, args...) }

	rr, kr, err := sampleBoth(runcExec, kilnExec, runs, thrRuns)
	if err != nil {
		return err
	}
	// The target compares stdout with a writer whose socket has stdout's window (the agent's stdio buffer); the
	// kernel's default buffer, a quarter of it, is printed beside it as the plain process's figure.
	raw, err := vsockRates(kilnExec, vsockPath, thrRuns, []uint64{agentstdio.SocketBuffer, 0})
	if err != nil {
		return err
	}
	fmt.Println()
	fmt.Printf("%-40s %10s %10s %10s\n", "containers (busybox bundle)", "kiln", "runc", "kiln/runc")
	fmt.Printf("%-40s %10.1f %10.1f %10.2f   (target <= 3)\n", fmt.Sprintf("exec round trip, ms (median of %d)", runs),
		ms(kr.execLatency), ms(rr.execLatency), float64(kr.execLatency)/float64(rr.execLatency))
	fmt.Printf("%-40s %10.1f %10.1f %10.2f   (target >= 0.3)\n", fmt.Sprintf("stdout throughput, MB/s (median of %d)", thrRuns),
		kr.mbPerSec, rr.mbPerSec, kr.mbPerSec/rr.mbPerSec)
	fmt.Printf("%-40s %10.1f %10s %10s   (the socket buffer of stdio, %d KiB)\n", "raw vsock from the guest, MB/s", raw[0], "", "", agentstdio.SocketBuffer>>10)
	fmt.Printf("%-40s %10.2f %10s %10s   (target >= 0.8)\n", "stdout / raw vsock", kr.mbPerSec/raw[0], "", "")
	fmt.Printf("%-40s %10.1f %10s %10s   (the kernel's default socket buffer)\n", "raw vsock, default buffer, MB/s", raw[1], "", "")
	fmt.Printf("%-40s %10.2f %10s %10s\n", "stdout / raw vsock, default buffer", kr.mbPerSec/raw[1], "", "")
	if tcg {
		return printTranslation(ctx, started, translation, kilnExec)
	}
	return nil
}

// execsTranslated is how many execs of `true` the per-exec translation figure averages.
const execsTranslated = 10

// translated is the VM's translation statistics, and false under KVM, where there are none.
func translated(ctx context.Context, translation func(context.Context) (qemu.Translation, error)) (qemu.Translation, bool, error) {
	t, err := translation(ctx)
	if errors.Is(err, qemu.ErrNoTranslation) {
		return t, false, nil
	}
	return t, err == nil, err
}

// printTranslation prints how much guest code QEMU translated (TCG's blocks): from the VM's start to the
// benchmark container running (the VM starts from its template, as by default), and for each exec of `true`
// once the exec path has run. Unlike times, these counts do not move with the host's load.
func printTranslation(ctx context.Context, started qemu.Translation, translation func(context.Context) (qemu.Translation, error), exec execFunc) error {
	before, err := translation(ctx)
	if err != nil {
		return err
	}
	for range execsTranslated {
		if _, err := exec(io.Discard, "true"); err != nil {
			return err
		}
	}
	after, err := translation(ctx)
	if err != nil {
		return err
	}
	fmt.Printf("%-40s %10s\n", "guest code translated (TCG)", "blocks")
	fmt.Printf("%-40s %10d   (%.1f MB of translated code)\n", "  VM start to the container running", started.Blocks, float64(started.CodeBytes)/1e6)
	fmt.Printf("%-40s %10d   (mean of %d; blocks invalidated: %d)\n", "  each exec of `true` after the first", (after.Blocks-before.Blocks)/execsTranslated,
		execsTranslated, after.Invalidated-before.Invalidated)
	return nil
}

// vsockPort is the host port the raw vsock baseline connects to.
const vsockPort = 7070

// vsockRates are the baselines stdout's throughput is held to: a process in the Kiln container (vsockwrite)
// writing throughputBytes to a vsock connection that the host reads through the same vsock back end as the
// container's stdio, timed, like stdout, from the exec request until the host has read everything. One median
// MB/s of thrRuns for each socket buffer (0: the kernel's default), the buffers taken in turn.
func vsockRates(exec execFunc, vsockPath string, thrRuns int, buffers []uint64) ([]float64, error) {
	if vsockPath == "" {
		return nil, errors.New("raw vsock baseline: the VM has no hybrid vsock socket")
	}
	l, err := net.Listen("unix", fmt.Sprintf("%s_%d", vsockPath, vsockPort))
	if err != nil {
		return nil, fmt.Errorf("raw vsock baseline: %w", err)
	}
	defer l.Close()
	rates := make([][]float64, len(buffers))
	for range thrRuns {
		for i, buffer := range buffers {
			got := make(chan int64, 1)
			go func() {
				c, err := l.Accept()
				if err != nil {
					got <- -1
					return
				}
				defer c.Close()
				n, _ := io.Copy(io.Discard, c)
				got <- n
			}()
			start := time.Now()
			args := []string{"/vsockwrite", fmt.Sprint(vsockPort), fmt.Sprint(throughputBytes), fmt.Sprint(buffer)}
			if _, err := exec(io.Discard, args...); err != nil {
				return nil, fmt.Errorf("raw vsock baseline, socket buffer %d: %w", buffer, err)
			}
			n := <-got
			d := time.Since(start)
			if n != throughputBytes {
				return nil, fmt.Errorf("raw vsock baseline, socket buffer %d: the host read %d bytes, want %d", buffer, n, throughputBytes)
			}
			rates[i] = append(rates[i], float64(n)/d.Seconds()/1e6)
		}
	}
	medians := make([]float64, len(buffers))
	for i := range rates {
		medians[i] = medianFloat(rates[i])
	}
	return medians, nil
}

// sampleBoth takes runs exec latency samples (`true`) and thrRuns stdout throughput samples from each runtime,
// alternating between the two and which goes first.
func sampleBoth(runc, kiln execFunc, runs, thrRuns int) (rr, kr containerResult, err error) {
	type side struct {
		name  string
		exec  execFunc
		lat   []time.Duration
		rates []float64
	}
	sides := [2]*side{{name: "runc", exec: runc}, {name: "kiln", exec: kiln}}
	for i := range runs {
		for j := range sides {
			s := sides[(i+j)%2]
			d, err := s.exec(io.Discard, "true")
			if err != nil {
				return rr, kr, err
			}
			s.lat = append(s.lat, d)
		}
	}
	for i := range thrRuns {
		for j := range sides {
			s := sides[(i+j)%2]
			var w countingWriter
			d, err := s.exec(&w, throughputArgs()...)
			if err != nil {
				return rr, kr, err
			}
			if w.n != throughputBytes {
				return rr, kr, fmt.Errorf("%s exec dd wrote %d bytes, want %d", s.name, w.n, throughputBytes)
			}
			s.rates = append(s.rates, float64(w.n)/d.Seconds()/1e6)
		}
	}
	result := func(s *side) containerResult {
		return containerResult{execLatency: median(s.lat), mbPerSec: medianFloat(s.rates)}
	}
	return result(sides[0]), result(sides[1]), nil
}

// startKiln boots a pod, creates and starts the benchmark container in it and returns how to exec in it, how to
// read its QEMU's translation statistics, and how to tear it all down.
func startKiln(ctx context.Context, base qemu.Config, initrd, bundleDir string, spec *specs.Spec) (_ execFunc, vsockPath string, translation func(context.Context) (qemu.Translation, error), _ func() error, retErr error) {
	cfg := config.Default()
	cfg.Runtime.StateDir = base.StateRoot
	cfg.Hypervisor.Kernel, cfg.Hypervisor.Initrd = base.Kernel, initrd
	cfg.Hypervisor.VCPUs, cfg.Hypervisor.MemoryMiB = base.VCPUs, base.MemoryMiB
	p, err := pod.New(ctx, pod.Options{ID: "kiln-containers", Config: cfg, Log: base.Log})
	if err != nil {
		return nil, "", nil, nil, err
	}
	closePod := func() error { return p.Close(context.WithoutCancel(ctx)) }
	defer func() {
		if retErr != nil {
			retErr = errors.Join(retErr, closePod())
		}
	}()
	b, err := bundle.Load(bundleDir)
	if err != nil {
		return nil, "", nil, nil, err
	}
	b.Spec = spec
	c, err := p.CreateContainer(ctx, pod.ContainerOptions{ID: "bench", Bundle: b})
	if err != nil {
		return nil, "", nil, nil, err
	}
	stop := func() error {
		_, err := p.DeleteContainer(context.WithoutCancel(ctx), c, true)
		return errors.Join(err, closePod())
	}
	if err := c.Start(ctx); err != nil {
		_, derr := p.DeleteContainer(context.WithoutCancel(ctx), c, true)
		return nil, "", nil, nil, errors.Join(err, derr)
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
	var vsock string
	if m, ok := p.Machine().(interface{ VsockPath() string }); ok {
		vsock = m.VsockPath()
	}
	m, ok := p.Machine().(interface {
		Translation(context.Context) (qemu.Translation, error)
	})
	if !ok {
		_, derr := p.DeleteContainer(context.WithoutCancel(ctx), c, true)
		return nil, "", nil, nil, errors.Join(fmt.Errorf("the pod's machine %T reports no translation statistics", p.Machine()), derr)
	}
	return execOnce, vsock, m.Translation, stop, nil
}

func medianFloat(xs []float64) float64 {
	s := slices.Clone(xs)
	slices.Sort(s)
	return s[len(s)/2]
}
