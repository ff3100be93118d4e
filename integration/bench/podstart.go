package main

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/kiln-runtime/kiln/integration/containerd"
	"github.com/kiln-runtime/kiln/integration/cri"
)

// podSteps is how long each step of a pod start took: runp, create and start.
type podSteps [3]time.Duration

func (s podSteps) total() time.Duration { return s[0] + s[1] + s[2] }

func (s podSteps) runp() time.Duration { return s[0] }

// medianOf is the median of f over runs.
func medianOf(runs []podSteps, f func(podSteps) time.Duration) time.Duration {
	ds := make([]time.Duration, len(runs))
	for i, r := range runs {
		ds[i] = f(r)
	}
	return median(ds)
}

// startCost is the host CPU a pod start took: in all, and by the name of the processes that lived through it.
type startCost struct {
	total  time.Duration
	byName map[string]time.Duration
}

// addTo adds the start's CPU by process name to sum.
func (c startCost) addTo(sum map[string]time.Duration) {
	for name, d := range c.byName {
		sum[name] += d
	}
}

// costMeter measures what a step costs the host (startCost), from meterCost until cost.
type costMeter struct {
	cpu   cpuMeter
	procs procTimes
}

func meterCost() (costMeter, error) {
	cpu, err := startCPU()
	if err != nil {
		return costMeter{}, err
	}
	procs, err := readProcTimes()
	return costMeter{cpu: cpu, procs: procs}, err
}

// cost is what the step cost since the meter started.
func (m costMeter) cost() (startCost, error) {
	total, err := m.cpu.used()
	if err != nil {
		return startCost{}, err
	}
	after, err := readProcTimes()
	if err != nil {
		return startCost{}, err
	}
	return startCost{total: total, byName: byName(m.procs, after)}, nil
}

// startPodCosted starts a pod running `sleep 3600` as startPod does, and measures what the start cost the host.
func startPodCosted(ctx context.Context, e *cri.Env, handler, name string) (podSteps, string, startCost, error) {
	m, err := meterCost()
	if err != nil {
		return podSteps{}, "", startCost{}, err
	}
	d, id, err := startPod(ctx, e, handler, name, 0, "sleep", "3600")
	if err != nil {
		return podSteps{}, "", startCost{}, err
	}
	c, err := m.cost()
	if err != nil {
		return podSteps{}, "", startCost{}, errors.Join(err, e.RemovePod(ctx, id))
	}
	return d, id, c, nil
}

// startPod runs a pod with one busybox container running cmd and returns how long runp, create and start took.
// The container is created pull after the pod's sandbox started (the time kubelet takes to pull its image), which
// the steps leave out.
func startPod(ctx context.Context, e *cri.Env, handler, name string, pull time.Duration, cmd ...string) (podSteps, string, error) {
	var steps podSteps
	pod := cri.NewPodConfig(name, e.PodLogDir(name))
	c := cri.NewContainerConfig("main", containerd.BusyboxRef, cmd...)
	t0 := time.Now()
	id, err := e.RunPod(ctx, handler, pod)
	if err != nil {
		return steps, "", err
	}
	runp := time.Since(t0)
	if pull > 0 {
		select {
		case <-time.After(pull):
		case <-ctx.Done():
			return steps, "", errors.Join(ctx.Err(), e.RemovePod(context.WithoutCancel(ctx), id))
		}
	}
	t1 := time.Now()
	cid, err := e.CreateContainer(ctx, id, c, pod)
	t2 := time.Now()
	if err == nil {
		_, err = e.Crictl(ctx, "start", cid)
	}
	steps = podSteps{runp, t2.Sub(t1), time.Since(t2)}
	if err != nil {
		_ = e.RemovePod(ctx, id)
		return steps, "", err
	}
	return steps, id, nil
}

// startPods starts n pods at once and returns the time until the last one's container runs, and what the burst
// cost the host until then: its busy CPU time, and by process name, read before the pods are removed (their VMs
// would be gone from the second reading).
func startPods(ctx context.Context, e *cri.Env, handler string, n int) (time.Duration, startCost, error) {
	var wg sync.WaitGroup
	ids := make([]string, n)
	errs := make([]error, n)
	m, err := meterCost()
	if err != nil {
		return 0, startCost{}, err
	}
	t0 := time.Now()
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, ids[i], errs[i] = startPod(ctx, e, handler, fmt.Sprintf("par-%s-%d", handler, i), 0, "sleep", "3600")
		}()
	}
	wg.Wait()
	d := time.Since(t0)
	// Before the pods are removed: their removal is not part of the start.
	c, costErr := m.cost()
	for i, id := range ids {
		if id != "" {
			if err := e.RemovePod(ctx, id); err != nil && errs[i] == nil {
				errs[i] = err
			}
		}
	}
	if err := errors.Join(append(errs, costErr)...); err != nil {
		return 0, startCost{}, err
	}
	return d, c, nil
}
