package main

import (
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"time"
)

// userHZ is the unit of /proc/stat's figures (USER_HZ, 100 on every Linux architecture Kiln runs on).
const userHZ = 100

// hostBusy is the CPU time the whole host has spent busy so far (user, nice, system, irq and softirq, summed over
// its CPUs), from /proc/stat. Steal is left out: it is time a hypervisor under this host gave to others. Taken
// around a step, it tells whether a slow step waited or worked: what ten pods started at once can take at best is
// their CPU time spread over the host's cores.
func hostBusy() (time.Duration, error) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, err
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	if len(f) < 9 || f[0] != "cpu" {
		return 0, fmt.Errorf("/proc/stat: unexpected first line %q", line)
	}
	var ticks int64
	// user nice system idle iowait irq softirq steal: every field but idle, iowait and steal.
	for i, v := range f[1:9] {
		if i == 3 || i == 4 || i == 7 {
			continue
		}
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("/proc/stat: field %d of %q: %w", i+1, line, err)
		}
		ticks += n
	}
	return time.Duration(ticks) * time.Second / userHZ, nil
}

// cpuMeter measures the host's busy CPU time across a step.
type cpuMeter struct{ start time.Duration }

func startCPU() (cpuMeter, error) {
	b, err := hostBusy()
	return cpuMeter{b}, err
}

// used is the busy CPU time since the meter started.
func (m cpuMeter) used() (time.Duration, error) {
	b, err := hostBusy()
	return b - m.start, err
}

// cpuBound is the shortest time work of the given CPU time can take on this host: spread over every core.
func cpuBound(work time.Duration) time.Duration { return work / time.Duration(runtime.NumCPU()) }

// procTimes is each process's CPU time so far, by pid.
type procTimes map[int]procTime

// procTime is a process's own CPU time (its threads') and that of the children it has waited for. start (when it
// started, in clock ticks after boot) tells a process from a later one given the same pid.
type procTime struct {
	comm     string
	start    string
	cpu      time.Duration
	children time.Duration
}

// readProcTimes reads every process's CPU time from /proc/<pid>/stat. A process that exits while it is read is
// left out.
func readProcTimes() (procTimes, error) {
	stats, err := readProcStats()
	if err != nil {
		return nil, err
	}
	out := procTimes{}
	for pid, st := range stats {
		// After comm: state(0) … utime(11) stime(12) cutime(13) cstime(14) … starttime(19).
		if len(st.fields) < 20 {
			continue
		}
		var ticks [4]int64
		for i, v := range st.fields[11:15] {
			n, err := strconv.ParseInt(v, 10, 64)
			if err != nil {
				return nil, fmt.Errorf("/proc/%d/stat: fields %q: %w", pid, st.fields, err)
			}
			ticks[i] = n
		}
		comm := st.comm
		// A kernel worker's name changes with its work item ("kworker/u8:1-events_unbound"): one name for all.
		if strings.HasPrefix(comm, "kworker/") {
			comm = "kworker"
		}
		out[pid] = procTime{
			comm:     comm,
			start:    st.fields[19],
			cpu:      time.Duration(ticks[0]+ticks[1]) * time.Second / userHZ,
			children: time.Duration(ticks[2]+ticks[3]) * time.Second / userHZ,
		}
	}
	return out, nil
}

// byName is the CPU time each process name used between before and after: a process alive at both counts its
// difference, one started since counts whole. A process that started and exited in between counts under its
// parent's name, as "<parent>'s children", once its parent has waited for it (containerd for CNI plugins and a
// shim's start and delete, the bench for crictl), with the whole life's CPU of each. Init's children are left
// out: it reaps the orphans, shims whose start has exited among them, and a shim of earlier work that ends within
// the readings would bring its whole life's CPU, its VM's included (a subreaper other than init would too).
func byName(before, after procTimes) map[string]time.Duration {
	out := map[string]time.Duration{}
	for pid, a := range after {
		d, c := a.cpu, a.children
		if b, ok := before[pid]; ok && b.comm == a.comm && b.start == a.start {
			d -= b.cpu
			c -= b.children
		}
		if pid == 1 {
			c = 0
		}
		if d > 0 {
			out[a.comm] += d
		}
		if c > 0 {
			out[a.comm+"'s children"] += c
		}
	}
	return out
}
