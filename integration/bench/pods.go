package main

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"time"

	"github.com/kiln-runtime/kiln/integration/containerd"
	"github.com/kiln-runtime/kiln/integration/cri"
)

// podsConfig is what the pods' Kiln configuration sets beyond the harness's.
type podsConfig struct {
	// fastStart is hypervisor.fast_start.
	fastStart string
	// hypervisor is more TOML lines of the [hypervisor] table.
	hypervisor string
	// poolOnly measures the spare pool alone (poolPodBench).
	poolOnly bool
}

// podBench measures pods through containerd's CRI plugin with crictl, Kiln's handler beside runc's on the same
// containerd: pod start (runp + create + start, and each step), 10 pods started at once, memory per idle pod
// (and where it is), and TCP throughput from the host to a pod.
func podBench(ctx context.Context, repo, share, tools, templates string, cfg podsConfig, runs, parallel int) error {
	if cfg.poolOnly {
		return poolPodBench(ctx, repo, share, tools, templates, cfg, runs, parallel)
	}
	e, err := startPodEnv(ctx, repo, share, tools, templates, cfg, false)
	if err != nil {
		return err
	}
	defer e.Stop(context.WithoutCancel(ctx))
	handlers := []string{cri.HandlerRunc, cri.HandlerKiln}
	fmt.Printf("pods: Kiln with hypervisor.fast_start = %q %s\n", cfg.fastStart, strings.ReplaceAll(cfg.hypervisor, "\n", "; "))

	started := map[string][]podSteps{}
	// The host's busy CPU time across each start: what a start costs the host, beside how long it takes.
	cpu := map[string][]time.Duration{}
	// And by process name, summed over the runs.
	cpuByName := map[string]map[string]time.Duration{}
	for i := range runs {
		for _, h := range handlers {
			d, id, c, err := startPodCosted(ctx, e, h, fmt.Sprintf("start-%s-%d", h, i))
			if err != nil {
				return err
			}
			if cpuByName[h] == nil {
				cpuByName[h] = map[string]time.Duration{}
			}
			c.addTo(cpuByName[h])
			started[h] = append(started[h], d)
			cpu[h] = append(cpu[h], c.total)
			if err := e.RemovePod(ctx, id); err != nil {
				return err
			}
		}
	}
	fmt.Printf("%-40s %10s %10s\n", "pods (CRI, median of "+fmt.Sprint(runs)+")", "ms", "ratio")
	rm, km := medianOf(started[cri.HandlerRunc], podSteps.total), medianOf(started[cri.HandlerKiln], podSteps.total)
	fmt.Printf("%-40s %10.1f %10s\n", "runc: pod start (runp+create+start)", ms(rm), "1.00")
	fmt.Printf("%-40s %10.1f %10.2f\n", "kiln: pod start, spare = false", ms(km), float64(km)/float64(rm))
	for j, step := range []string{"runp", "create", "start"} {
		stepOf := func(s podSteps) time.Duration { return s[j] }
		r, k := medianOf(started[cri.HandlerRunc], stepOf), medianOf(started[cri.HandlerKiln], stepOf)
		fmt.Printf("%-40s %10.1f %10.2f   (runc %.1f ms)\n", "  kiln: "+step, ms(k), float64(k)/float64(r), ms(r))
	}
	if err := backToBack(ctx, e, runs, ms(rm), false); err != nil {
		return err
	}

	together, togetherCPU, togetherByName := map[string]time.Duration{}, map[string]time.Duration{}, map[string]map[string]time.Duration{}
	for _, h := range handlers {
		d, c, err := startPods(ctx, e, h, parallel)
		if err != nil {
			return err
		}
		together[h], togetherCPU[h], togetherByName[h] = d, c.total, c.byName
	}
	label := fmt.Sprintf("%d pods started at once", parallel)
	fmt.Printf("%-40s %10.1f %10s\n", "runc: "+label, ms(together[cri.HandlerRunc]), "1.00")
	fmt.Printf("%-40s %10.1f %10.2f\n", "kiln: "+label, ms(together[cri.HandlerKiln]), float64(together[cri.HandlerKiln])/float64(together[cri.HandlerRunc]))
	fmt.Printf("%-40s %10s %10.2f   (target <= 3)\n", fmt.Sprintf("kiln: %d at once / one pod start", parallel), "", float64(together[cri.HandlerKiln])/float64(km))
	// The same ratio for runc: what this host allows a runtime whose starts are CPU work too.
	fmt.Printf("%-40s %10s %10.2f\n", fmt.Sprintf("runc: %d at once / one pod start", parallel), "", float64(together[cri.HandlerRunc])/float64(rm))
	// Host CPU: a start that only waited would overlap with the others; one that emulates cannot finish the ten
	// sooner than their CPU time spread over the host's cores (the bound below), whatever Kiln does.
	for _, h := range handlers {
		one, all := median(cpu[h]), togetherCPU[h]
		fmt.Printf("%-40s %10.1f   (%d at once: %.1f ms each, %.2fx; all of them on %d cores take at least %.1f ms)\n",
			h+": host CPU per pod start, ms", ms(one), parallel, ms(all)/float64(parallel),
			float64(all)/float64(parallel)/float64(one), runtime.NumCPU(), ms(cpuBound(all)))
	}
	fmt.Printf("%-40s %10s %10.2f\n", fmt.Sprintf("kiln: CPU-bound floor of %d at once / one", parallel), "",
		float64(cpuBound(togetherCPU[cri.HandlerKiln]))/float64(km))
	for _, h := range handlers {
		fmt.Printf("%-40s %s\n", h+": CPU per pod start, by process", topNames(cpuByName[h], runs, 8))
		fmt.Printf("%-40s %s\n", fmt.Sprintf("%s: CPU per pod, %d at once", h, parallel), topNames(togetherByName[h], parallel, 8))
	}

	mem := map[string]memoryParts{}
	for _, h := range handlers {
		m, err := podMemory(ctx, e, h, parallel, templates, nil)
		if err != nil {
			return err
		}
		mem[h] = m
	}
	fmt.Printf("%-40s %10s\n", fmt.Sprintf("host memory per idle pod (%d pods)", parallel), "MB (PSS)")
	fmt.Printf("%-40s %10.1f\n", "runc", float64(mem[cri.HandlerRunc].total())/1e6)
	fmt.Printf("%-40s %10.1f\n", "kiln, spare = false", float64(mem[cri.HandlerKiln].total())/1e6)
	fmt.Printf("  kiln, spare = false, MB per pod: %s\n", mem[cri.HandlerKiln])

	thr := map[string]float64{}
	for _, h := range handlers {
		mbps, err := podThroughput(ctx, e, h, runs)
		if err != nil {
			return err
		}
		thr[h] = mbps
	}
	fmt.Printf("%-40s %10s %10s\n", "TCP host to pod (median)", "MB/s", "ratio")
	fmt.Printf("%-40s %10.1f %10s\n", "runc: TCP host to pod", thr[cri.HandlerRunc], "1.00")
	fmt.Printf("%-40s %10.1f %10.2f\n", "kiln: TCP host to pod", thr[cri.HandlerKiln], thr[cri.HandlerKiln]/thr[cri.HandlerRunc])
	return sparePodBench(ctx, repo, share, tools, templates, cfg, runs, parallel)
}

// sparePodBench measures, with Kiln's defaults (spare shims on), pod start beside runc and memory per idle pod, on
// a containerd of its own: with spares on, the pods of the other measurements would take them. Each timed pair
// of starts first waits (up to a minute) for the spare to be ready, as on a host whose pods do not start back to
// back. The idle pods' memory counts the spare their shims started, as one of their processes.
func sparePodBench(ctx context.Context, repo, share, tools, templates string, cfg podsConfig, runs, parallel int) error {
	e, err := startPodEnv(ctx, repo, share, tools, templates, cfg, true)
	if err != nil {
		return err
	}
	// e.Stop stops the spare too (containerd.Daemon.Stop).
	defer e.Stop(context.WithoutCancel(ctx))
	started, found, err := fromReadySpares(ctx, e, runs, "spare", 0)
	if err != nil {
		return err
	}
	rm, km := medianOf(started[cri.HandlerRunc], podSteps.total), medianOf(started[cri.HandlerKiln], podSteps.total)
	fmt.Printf("%-40s %10.1f %10.2f   (target <= 4; runc %.1f ms in the same loop; a ready spare before %d of %d runs)\n",
		"kiln: pod start, default (ready spare)", ms(km), float64(km)/float64(rm), ms(rm), found, runs)
	// A spare's adoption (its pod taking the task's network) is in runp, the pod's first container's create.
	adopted, err := adoptions(e.Daemon.LogPath)
	if err != nil {
		return err
	}
	adoption := "no adoption logged"
	if len(adopted) > 0 {
		adoption = fmt.Sprintf("the spare's adoption in it %.1f ms, median of %d", ms(median(adopted)), len(adopted))
	}
	rp, kp := medianOf(started[cri.HandlerRunc], podSteps.runp), medianOf(started[cri.HandlerKiln], podSteps.runp)
	fmt.Printf("%-40s %10.1f %10.2f   (runc %.1f ms; %s)\n", "  kiln: runp (ready spare)", ms(kp), float64(kp)/float64(rp), ms(rp), adoption)
	if err := pulledImage(ctx, e, runs); err != nil {
		return err
	}
	if err := execBesideBoot(ctx, e, runs); err != nil {
		return err
	}
	if err := backToBack(ctx, e, runs, ms(rm), true); err != nil {
		return err
	}
	m, err := podMemory(ctx, e, cri.HandlerKiln, parallel, templates, nil)
	if err != nil {
		return err
	}
	fmt.Printf("%-40s %10.1f   (target <= 60; %d pods and the spare shim)\n", "kiln: memory per idle pod, default", float64(m.total())/1e6, parallel)
	fmt.Printf("  kiln, default, MB per pod: %s\n", m)
	return poolPodBench(ctx, repo, share, tools, templates, cfg, runs, parallel)
}

// fromReadySpares starts runs pairs of pods, runc's then Kiln's, each pair once a spare is ready (up to a minute),
// their containers pull after their sandboxes (startPod), and returns their steps by handler and how many pairs
// found a ready spare.
func fromReadySpares(ctx context.Context, e *cri.Env, runs int, name string, pull time.Duration) (map[string][]podSteps, int, error) {
	started := map[string][]podSteps{}
	found := 0
	for i := range runs {
		if containerd.WaitSpare(e.Daemon.Address, time.Minute) {
			found++
		}
		for _, h := range []string{cri.HandlerRunc, cri.HandlerKiln} {
			d, id, err := startPod(ctx, e, h, fmt.Sprintf("%s-%s-%d", name, h, i), pull, "sleep", "3600")
			if err != nil {
				return nil, 0, err
			}
			started[h] = append(started[h], d)
			if err := e.RemovePod(ctx, id); err != nil {
				return nil, 0, err
			}
		}
	}
	return started, found, nil
}

// imagePull is how long after its sandbox a pod's container comes in pulledImage: the time kubelet takes to pull
// the container's image.
const imagePull = 3 * time.Second

// pulledImage measures a pod whose container comes imagePull after its sandbox, each start finding a ready spare:
// create and start beside runc's. The spare the pod's shim started boots meanwhile.
func pulledImage(ctx context.Context, e *cri.Env, runs int) error {
	started, found, err := fromReadySpares(ctx, e, runs, "pull", imagePull)
	if err != nil {
		return err
	}
	after := func(s podSteps) time.Duration { return s[1] + s[2] }
	r, k := medianOf(started[cri.HandlerRunc], after), medianOf(started[cri.HandlerKiln], after)
	fmt.Printf("%-40s %10.1f %10.2f   (runc %.1f ms; the container %s after its sandbox; a ready spare before %d of %d runs)\n",
		"kiln: create+start after an image pull", ms(k), float64(k)/float64(r), ms(r), imagePull, found, runs)
	return nil
}

// idleExecs is how many exec round trips execBesideBoot times once the spare is ready, in each run.
const idleExecs = 5

// execBesideBoot measures exec round trips (`crictl exec`, as a probe runs) into a pod's container while the spare
// its shim started boots, beside the same pod's round trips once that spare is ready: each run starts a pod from a
// ready spare, runs execs one after another until the new spare is ready, then idleExecs more.
func execBesideBoot(ctx context.Context, e *cri.Env, runs int) error {
	var beside, idle []time.Duration
	addr := e.Daemon.Address
	for i := range runs {
		if !containerd.WaitSpare(addr, time.Minute) {
			return fmt.Errorf("exec beside a booting spare: no spare ready within a minute")
		}
		_, id, err := startPod(ctx, e, cri.HandlerKiln, fmt.Sprintf("exec-%d", i), 0, "sleep", "3600")
		if err != nil {
			return err
		}
		cid, err := e.Crictl(ctx, "ps", "-q", "--pod", id)
		if err != nil {
			return errors.Join(err, e.RemovePod(ctx, id))
		}
		cid = strings.TrimSpace(cid)
		// The pod's spare boots spareDelay (2 s) after its first container's start.
		for deadline := time.Now().Add(10 * time.Second); !containerd.SpareBooting(addr) && time.Now().Before(deadline); {
			time.Sleep(5 * time.Millisecond)
		}
		timeExec := func() (time.Duration, error) {
			t := time.Now()
			_, _, _, err := e.Exec(ctx, cid, "true")
			return time.Since(t), err
		}
		for containerd.SpareBooting(addr) {
			d, err := timeExec()
			if err != nil {
				return errors.Join(err, e.RemovePod(ctx, id))
			}
			if containerd.SpareBooting(addr) {
				beside = append(beside, d)
			}
		}
		if !containerd.WaitSpare(addr, time.Minute) {
			return errors.Join(fmt.Errorf("exec beside a booting spare: the spare was not ready a minute after its boot"), e.RemovePod(ctx, id))
		}
		for range idleExecs {
			d, err := timeExec()
			if err != nil {
				return errors.Join(err, e.RemovePod(ctx, id))
			}
			idle = append(idle, d)
		}
		if err := e.RemovePod(ctx, id); err != nil {
			return err
		}
	}
	if len(beside) == 0 {
		fmt.Printf("%-40s %10s   (no exec while a spare booted, of %d runs)\n", "kiln: exec beside a booting spare", "-", runs)
		return nil
	}
	b, d := median(beside), median(idle)
	fmt.Printf("%-40s %10.1f %10.2f   (crictl exec; %.1f ms once the spare is ready; %d round trips beside it in %d runs)\n",
		"kiln: exec beside a booting spare", ms(b), float64(b)/float64(d), ms(d), len(beside), runs)
	return nil
}

// backToBack measures Kiln's pod starts back to back: each pod starts as soon as the last is removed. With spares
// (the defaults), the last pod's shim's exit let the spare it started boot: a start finds that spare ready, or
// still booting, and then starts from its template beside it (the spare boots at the lowest weight, but under TCG
// it still takes the CPU the start leaves idle, and delays the start). Without spares the same loop is the
// baseline: a start beside the last pod's teardown and nothing else. runcMs is the baseline to print beside.
func backToBack(ctx context.Context, e *cri.Env, runs int, runcMs float64, spares bool) error {
	// What the starts of each kind took, and the host CPU they cost by process: beside a booting spare, the
	// spare's QEMU and shim show as more of those processes' CPU than the same loop spends without spares.
	type bucket struct {
		name  string
		steps []podSteps
		cpu   map[string]time.Duration
	}
	besideBoot, fromSpare := &bucket{name: "beside a booting spare"}, &bucket{name: "from a ready spare"}
	if !spares {
		besideBoot.name = "spare = false"
	}
	for i := range 2 * runs {
		b := besideBoot
		if spares && containerd.WaitSpare(e.Daemon.Address, 0) {
			b = fromSpare
		}
		d, id, c, err := startPodCosted(ctx, e, cri.HandlerKiln, fmt.Sprintf("b2b-%d", i))
		if err != nil {
			return err
		}
		if b.cpu == nil {
			b.cpu = map[string]time.Duration{}
		}
		c.addTo(b.cpu)
		b.steps = append(b.steps, d)
		if err := e.RemovePod(ctx, id); err != nil {
			return err
		}
	}
	buckets := []*bucket{besideBoot}
	if spares {
		buckets = append(buckets, fromSpare)
		// The loop as a whole: a policy that makes the starts beside a booting spare cheaper but leaves fewer
		// spares ready shows here, where neither line alone tells.
		all := append(append([]podSteps(nil), besideBoot.steps...), fromSpare.steps...)
		km := medianOf(all, podSteps.total)
		fmt.Printf("%-40s %10.1f %10.2f   (runc %.1f ms above; median of all %d starts)\n", "kiln: back to back, defaults", ms(km), ms(km)/runcMs,
			runcMs, len(all))
	}
	for _, b := range buckets {
		if len(b.steps) == 0 {
			fmt.Printf("%-40s %10s   (none of %d)\n", "kiln: back to back, "+b.name, "-", 2*runs)
			continue
		}
		km := medianOf(b.steps, podSteps.total)
		fmt.Printf("%-40s %10.1f %10.2f   (runc %.1f ms above; %d of %d starts)\n", "kiln: back to back, "+b.name, ms(km), ms(km)/runcMs,
			runcMs, len(b.steps), 2*runs)
		fmt.Printf("  %-38s %s\n", "CPU per start, by process", topNames(b.cpu, len(b.steps), 8))
	}
	return nil
}

// poolFill bounds the wait for a spare pool to fill: its spares boot at the lowest priority, one after another's
// CPU under TCG.
const poolFill = 5 * time.Minute

// poolPodBench measures a burst with a pool of parallel spares (hypervisor.spare_pool), on a containerd of its
// own: parallel pods started at once, each taking a spare, beside one pod start from the pool (the pool full
// before each), and the memory per idle pod with the pool filled again, which the pool's spares are part of.
func poolPodBench(ctx context.Context, repo, share, tools, templates string, cfg podsConfig, runs, parallel int) error {
	cfg.hypervisor += fmt.Sprintf("\nspare_pool = %d\n", parallel)
	e, err := startPodEnv(ctx, repo, share, tools, templates, cfg, true)
	if err != nil {
		return err
	}
	defer e.Stop(context.WithoutCancel(ctx))
	full := func() error {
		if !containerd.WaitSpares(e.Daemon.Address, parallel, poolFill) {
			return fmt.Errorf("the pool of %d spares was not full within %s", parallel, poolFill)
		}
		return nil
	}
	start := time.Now()
	if err := full(); err != nil {
		return err
	}
	filled := time.Since(start)
	var one []podSteps
	for i := range runs {
		if err := full(); err != nil {
			return err
		}
		d, id, err := startPod(ctx, e, cri.HandlerKiln, fmt.Sprintf("pool-%d", i), 0, "sleep", "3600")
		if err != nil {
			return err
		}
		one = append(one, d)
		if err := e.RemovePod(ctx, id); err != nil {
			return err
		}
	}
	if err := full(); err != nil {
		return err
	}
	together, cost, err := startPods(ctx, e, cri.HandlerKiln, parallel)
	if err != nil {
		return err
	}
	cpu := cost.total
	// The burst's pods are gone; their shims' spares refill the pool.
	refill := time.Now()
	if !containerd.WaitSpares(e.Daemon.Address, 1, poolFill) {
		return fmt.Errorf("no spare was ready within %s of the burst", poolFill)
	}
	first := time.Since(refill)
	if err := full(); err != nil {
		return err
	}
	refilled := time.Since(refill)
	km := medianOf(one, podSteps.total)
	fmt.Printf("%-40s %10.1f   (its first fill took %.1f s)\n", fmt.Sprintf("kiln, spare_pool = %d: one pod start", parallel), ms(km), filled.Seconds())
	fmt.Printf("%-40s %10.1f %10.2f   (target <= 3; host CPU %.1f ms per pod, CPU-bound floor %.2f)\n",
		fmt.Sprintf("kiln, spare_pool = %d: %d at once / one", parallel, parallel), ms(together), float64(together)/float64(km),
		ms(cpu)/float64(parallel), float64(cpuBound(cpu))/float64(km))
	fmt.Printf("%-40s %s\n", fmt.Sprintf("kiln, spare_pool = %d: CPU per pod at once", parallel), topNames(cost.byName, parallel, 8))
	fmt.Printf("%-40s %10.1f   (s after the burst's pods were removed; the pool full again after %.1f s)\n",
		fmt.Sprintf("kiln, spare_pool = %d: a spare ready", parallel), first.Seconds(), refilled.Seconds())
	m, err := podMemory(ctx, e, cri.HandlerKiln, parallel, templates, full)
	if err != nil {
		return err
	}
	fmt.Printf("%-40s %10.1f   (%d pods and the pool's %d spares)\n", fmt.Sprintf("kiln, spare_pool = %d: memory per idle pod", parallel),
		float64(m.total())/1e6, parallel, parallel)
	fmt.Printf("  kiln, spare_pool = %d, MB per pod: %s\n", parallel, m)
	return nil
}

// startPodEnv starts containerd with CRI, runc's handler and Kiln's (with spare shims when spare is set), and
// starts and removes one pod of each, not counted: they pull their images into place, and Kiln's builds the
// template (and starts the first spare).
func startPodEnv(ctx context.Context, repo, share, tools, templates string, cfg podsConfig, spare bool) (*cri.Env, error) {
	e, err := cri.Start(ctx, cri.Options{
		RepoRoot: repo, ToolsDir: tools, KilnAssets: share,
		Handlers: []string{cri.HandlerRunc, cri.HandlerKiln},
		// Ten guests booting at once under TCG on two cores take minutes, not the default minute.
		KilnConfigExtra: fmt.Sprintf("[agent]\ndial_timeout = \"10m\"\n[hypervisor]\nfast_start = %q\ntemplate_dir = %q\nspare = %t\n%s\n",
			cfg.fastStart, templates, spare, cfg.hypervisor),
	})
	if err != nil {
		return nil, fmt.Errorf("start containerd with CRI: %w", err)
	}
	for _, h := range []string{cri.HandlerRunc, cri.HandlerKiln} {
		_, id, err := startPod(ctx, e, h, "warm-"+h, 0, "true")
		if err == nil {
			err = e.RemovePod(ctx, id)
		}
		if err != nil {
			_ = e.Stop(context.WithoutCancel(ctx))
			return nil, err
		}
	}
	return e, nil
}

// podThroughputBytes is what each throughput run sends.
const podThroughputBytes = 128 << 20

// podThroughput sends podThroughputBytes from the host to a pod's busybox nc, runs times, and returns the median
// rate: from connect until the pod has read everything and answered.
func podThroughput(ctx context.Context, e *cri.Env, handler string, runs int) (float64, error) {
	_, id, err := startPod(ctx, e, handler, "tcp-"+handler, 0, "nc", "-ll", "-p", "5001", "-e", "sh", "-c", "cat > /dev/null; echo done")
	if err != nil {
		return 0, err
	}
	defer e.RemovePod(context.WithoutCancel(ctx), id)
	ips, err := e.PodIPs(ctx, id)
	if err != nil {
		return 0, err
	}
	addr := net.JoinHostPort(ips[0], "5001")
	var rates []float64
	buf := make([]byte, 1<<20)
	for range runs {
		var conn net.Conn
		deadline := time.Now().Add(30 * time.Second)
		for {
			if conn, err = net.DialTimeout("tcp", addr, 5*time.Second); err == nil || time.Now().After(deadline) {
				break
			}
			time.Sleep(200 * time.Millisecond)
		}
		if err != nil {
			return 0, fmt.Errorf("connect to %s pod at %s: %w", handler, addr, err)
		}
		t0 := time.Now()
		for sent := 0; sent < podThroughputBytes; sent += len(buf) {
			if _, err := conn.Write(buf); err != nil {
				conn.Close()
				return 0, fmt.Errorf("send to %s pod: %w", handler, err)
			}
		}
		_ = conn.(*net.TCPConn).CloseWrite()
		reply, err := io.ReadAll(conn)
		d := time.Since(t0)
		conn.Close()
		if err != nil || strings.TrimSpace(string(reply)) != "done" {
			return 0, fmt.Errorf("%s pod's reply %q: %v", handler, reply, err)
		}
		rates = append(rates, float64(podThroughputBytes)/d.Seconds()/1e6)
	}
	return medianFloat(rates), nil
}

// repoRoot is the source tree the bench runs from (make bench runs it at the top).
func repoRoot() (string, error) { return filepath.Abs(".") }

// topNames formats the n process names that used the most CPU, each as its mean over runs in milliseconds.
func topNames(byName map[string]time.Duration, runs, n int) string {
	names := slices.Collect(maps.Keys(byName))
	slices.SortFunc(names, func(a, b string) int { return cmp.Compare(byName[b], byName[a]) })
	var parts []string
	for _, name := range names[:min(n, len(names))] {
		parts = append(parts, fmt.Sprintf("%s %.0f", name, ms(byName[name])/float64(runs)))
	}
	return strings.Join(parts, ", ")
}
