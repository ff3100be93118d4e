package task

import (
	"math"

	v2 "github.com/containerd/cgroups/v3/cgroup2/stats"

	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
)

// metrics maps the agent's cgroup v2 figures onto containerd's cgroups v2 metrics, field for field (both are
// named after the cgroup files).
func metrics(st *agentv1.StatsContainerResponse) *v2.Metrics {
	m := &v2.Metrics{}
	if p := st.GetPids(); p != nil {
		m.Pids = &v2.PidsStat{Current: p.GetCurrent(), Limit: p.GetLimit()}
	}
	if c := st.GetCpu(); c != nil {
		m.CPU = &v2.CPUStat{
			UsageUsec: c.GetUsageUsec(), UserUsec: c.GetUserUsec(), SystemUsec: c.GetSystemUsec(),
			NrPeriods: c.GetNrPeriods(), NrThrottled: c.GetNrThrottled(), ThrottledUsec: c.GetThrottledUsec(),
			PSI: psi(c.GetPsi()),
		}
	}
	if mem := st.GetMemory(); mem != nil {
		m.Memory = &v2.MemoryStat{
			Usage: mem.GetUsage(), UsageLimit: mem.GetUsageLimit(), SwapUsage: mem.GetSwapUsage(), SwapLimit: mem.GetSwapLimit(),
			Anon: mem.GetAnon(), File: mem.GetFile(), KernelStack: mem.GetKernelStack(), Slab: mem.GetSlab(),
			Sock: mem.GetSock(), Shmem: mem.GetShmem(), FileMapped: mem.GetFileMapped(), FileDirty: mem.GetFileDirty(),
			FileWriteback: mem.GetFileWriteback(), Pgfault: mem.GetPgfault(), Pgmajfault: mem.GetPgmajfault(),
			InactiveAnon: mem.GetInactiveAnon(), ActiveAnon: mem.GetActiveAnon(), InactiveFile: mem.GetInactiveFile(),
			ActiveFile: mem.GetActiveFile(), Unevictable: mem.GetUnevictable(),
			MaxUsage: mem.GetMaxUsage(), SwapMaxUsage: mem.GetSwapMaxUsage(), PSI: psi(mem.GetPsi()),
		}
		m.MemoryEvents = &v2.MemoryEvents{Oom: mem.GetOom(), OomKill: mem.GetOomKill(), Max: mem.GetMax(), High: mem.GetHigh()}
	}
	if io := st.GetIo(); io != nil {
		m.Io = &v2.IOStat{PSI: psi(io.GetPsi())}
		for _, e := range io.GetUsage() {
			m.Io.Usage = append(m.Io.Usage, &v2.IOEntry{
				Major: e.GetMajor(), Minor: e.GetMinor(), Rbytes: e.GetRbytes(), Wbytes: e.GetWbytes(), Rios: e.GetRios(), Wios: e.GetWios(),
			})
		}
	}
	return m
}

// psi maps the agent's pressure figures. The guest reports them: an average that is not a share of time (not a
// number, infinite, outside 0 to 100 percent) reads as 0 rather than reaching containerd's consumers.
func psi(p *agentv1.PSIStats) *v2.PSIStats {
	if p == nil {
		return nil
	}
	data := func(d *agentv1.PSIData) *v2.PSIData {
		if d == nil {
			return nil
		}
		share := func(v float64) float64 {
			if math.IsNaN(v) || v < 0 || v > 100 {
				return 0
			}
			return v
		}
		return &v2.PSIData{Avg10: share(d.GetAvg10()), Avg60: share(d.GetAvg60()), Avg300: share(d.GetAvg300()), Total: d.GetTotal()}
	}
	return &v2.PSIStats{Some: data(p.GetSome()), Full: data(p.GetFull())}
}
