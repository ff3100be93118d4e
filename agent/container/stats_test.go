package container

import (
	"math"
	"testing"

	"google.golang.org/protobuf/proto"

	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
)

func TestReadStatsFromCgroupFiles(t *testing.T) {
	got, err := readStats("testdata/cgroup")
	if err != nil {
		t.Fatal(err)
	}
	want := &agentv1.StatsContainerResponse{
		Cpu: &agentv1.CPUStats{UsageUsec: 1000, UserUsec: 600, SystemUsec: 400, NrPeriods: 5, NrThrottled: 2, ThrottledUsec: 77,
			Psi: &agentv1.PSIStats{Some: &agentv1.PSIData{Avg10: 1.5, Avg60: 0.25, Avg300: 0.05, Total: 123456}, Full: &agentv1.PSIData{}}},
		Memory: &agentv1.MemoryStats{
			Usage: 1234567, UsageLimit: 33554432, SwapUsage: 0, SwapLimit: math.MaxUint64,
			Anon: 4096, File: 8192, KernelStack: 16384, Slab: 100, Shmem: 12, FileMapped: 13, FileDirty: 14,
			FileWriteback: 15, Pgfault: 900, Pgmajfault: 3, InactiveAnon: 1, ActiveAnon: 2, InactiveFile: 3,
			ActiveFile: 4, Unevictable: 5, Oom: 2, OomKill: 1, Max: 7, High: 6, MaxUsage: 45678901,
			Psi: &agentv1.PSIStats{Some: &agentv1.PSIData{Avg10: 12.34, Avg60: 5, Avg300: 1, Total: 999}, Full: &agentv1.PSIData{Avg10: 10, Avg60: 4, Avg300: 0.5, Total: 888}},
		},
		Pids: &agentv1.PidsStats{Current: 3, Limit: math.MaxUint64},
		Io: &agentv1.IOStats{Usage: []*agentv1.IOEntry{{Major: 254, Minor: 0, Rbytes: 4096, Wbytes: 8192, Rios: 1, Wios: 2}},
			Psi: &agentv1.PSIStats{Some: &agentv1.PSIData{Total: 7}, Full: &agentv1.PSIData{Total: 6}}},
	}
	if !proto.Equal(got, want) {
		t.Errorf("stats:\n got %v\nwant %v", got, want)
	}
}

// A cgroup without some controllers has no files for them: zeros, no error.
func TestReadStatsMissingFiles(t *testing.T) {
	got, err := readStats(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if got.GetMemory().GetUsage() != 0 || got.GetPids().GetCurrent() != 0 || len(got.GetIo().GetUsage()) != 0 {
		t.Errorf("stats of an empty directory: %v", got)
	}
}

func TestParseMalformed(t *testing.T) {
	if _, err := parseKeyed("usage_usec x\n"); err == nil {
		t.Error("parseKeyed accepted a non-number")
	}
	if _, err := parseKeyed("a 1 2\n"); err == nil {
		t.Error("parseKeyed accepted three fields")
	}
	if _, err := parseSingle("12abc"); err == nil {
		t.Error("parseSingle accepted garbage")
	}
	for _, bad := range []string{"avg10=1\n", "some avg10\n", "some avg10=x\n", "some total=-1\n"} {
		if _, err := parsePSI(bad); err == nil {
			t.Errorf("parsePSI accepted %q", bad)
		}
	}
	if _, err := parseIOStat("254 rbytes=1\n"); err == nil {
		t.Error("parseIOStat accepted a line without MAJ:MIN")
	}
	if _, err := parseIOStat("254:0 rbytes\n"); err == nil {
		t.Error("parseIOStat accepted a field without =")
	}
}
