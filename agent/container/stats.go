package container

import (
	"bufio"
	"errors"
	"fmt"
	"io/fs"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
)

// readStats reads a cgroup v2 directory's figures. A file that does not
// exist (its controller is not enabled for the cgroup) leaves its figures
// at zero.
func readStats(dir string) (*agentv1.StatsContainerResponse, error) {
	cpu, err := readKeyed(dir, "cpu.stat")
	if err != nil {
		return nil, err
	}
	mem, err := readKeyed(dir, "memory.stat")
	if err != nil {
		return nil, err
	}
	events, err := readKeyed(dir, "memory.events")
	if err != nil {
		return nil, err
	}
	single := map[string]uint64{}
	for _, name := range []string{"memory.current", "memory.max", "memory.swap.current", "memory.swap.max", "memory.peak", "memory.swap.peak", "pids.current", "pids.max"} {
		v, err := readSingle(dir, name)
		if err != nil {
			return nil, err
		}
		single[name] = v
	}
	io, err := readIOStat(dir)
	if err != nil {
		return nil, err
	}
	psi := map[string]*agentv1.PSIStats{}
	for _, name := range []string{"cpu.pressure", "memory.pressure", "io.pressure"} {
		if psi[name], err = readPSI(dir, name); err != nil {
			return nil, err
		}
	}
	return &agentv1.StatsContainerResponse{
		Cpu: &agentv1.CPUStats{
			UsageUsec:     cpu["usage_usec"],
			UserUsec:      cpu["user_usec"],
			SystemUsec:    cpu["system_usec"],
			NrPeriods:     cpu["nr_periods"],
			NrThrottled:   cpu["nr_throttled"],
			ThrottledUsec: cpu["throttled_usec"],
			Psi:           psi["cpu.pressure"],
		},
		Memory: &agentv1.MemoryStats{
			Usage:         single["memory.current"],
			UsageLimit:    single["memory.max"],
			SwapUsage:     single["memory.swap.current"],
			SwapLimit:     single["memory.swap.max"],
			Anon:          mem["anon"],
			File:          mem["file"],
			KernelStack:   mem["kernel_stack"],
			Slab:          mem["slab"],
			Sock:          mem["sock"],
			Shmem:         mem["shmem"],
			FileMapped:    mem["file_mapped"],
			FileDirty:     mem["file_dirty"],
			FileWriteback: mem["file_writeback"],
			Pgfault:       mem["pgfault"],
			Pgmajfault:    mem["pgmajfault"],
			InactiveAnon:  mem["inactive_anon"],
			ActiveAnon:    mem["active_anon"],
			InactiveFile:  mem["inactive_file"],
			ActiveFile:    mem["active_file"],
			Unevictable:   mem["unevictable"],
			Oom:           events["oom"],
			OomKill:       events["oom_kill"],
			Max:           events["max"],
			High:          events["high"],
			MaxUsage:      single["memory.peak"],
			SwapMaxUsage:  single["memory.swap.peak"],
			Psi:           psi["memory.pressure"],
		},
		Pids: &agentv1.PidsStats{Current: single["pids.current"], Limit: single["pids.max"]},
		Io:   &agentv1.IOStats{Usage: io, Psi: psi["io.pressure"]},
	}, nil
}

// readOptional reads a cgroup file; a missing one reads as empty.
func readOptional(dir, name string) (string, error) {
	b, err := os.ReadFile(filepath.Join(dir, name))
	if errors.Is(err, fs.ErrNotExist) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("read cgroup file %s: %w", filepath.Join(dir, name), err)
	}
	return string(b), nil
}

// readKeyed parses a flat-keyed file ("key value" lines).
func readKeyed(dir, name string) (map[string]uint64, error) {
	text, err := readOptional(dir, name)
	if err != nil {
		return nil, err
	}
	out, err := parseKeyed(text)
	if err != nil {
		return nil, fmt.Errorf("parse %s: %w", filepath.Join(dir, name), err)
	}
	return out, nil
}

func parseKeyed(text string) (map[string]uint64, error) {
	out := map[string]uint64{}
	sc := bufio.NewScanner(strings.NewReader(text))
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) == 0 {
			continue
		}
		if len(fields) != 2 {
			return nil, fmt.Errorf("line %q: want \"key value\"", sc.Text())
		}
		v, err := strconv.ParseUint(fields[1], 10, 64)
		if err != nil {
			return nil, fmt.Errorf("line %q: %w", sc.Text(), err)
		}
		out[fields[0]] = v
	}
	return out, sc.Err()
}

// readSingle parses a single-value file; "max" (no limit) reads as the
// largest uint64, as the API documents and containerd's cgroup v2 metrics
// report it (CRI computes a container's available memory from it).
func readSingle(dir, name string) (uint64, error) {
	text, err := readOptional(dir, name)
	if err != nil {
		return 0, err
	}
	v, err := parseSingle(text)
	if err != nil {
		return 0, fmt.Errorf("parse %s: %w", filepath.Join(dir, name), err)
	}
	return v, nil
}

func parseSingle(text string) (uint64, error) {
	s := strings.TrimSpace(text)
	if s == "" {
		return 0, nil
	}
	if s == "max" {
		return math.MaxUint64, nil
	}
	return strconv.ParseUint(s, 10, 64)
}

// readPSI reads a pressure file ("some avg10=0.00 avg60=0.00 avg300=0.00 total=0", and a "full" line but for
// cpu.pressure on older kernels); nil when there is none to read: no CONFIG_PSI, or pressure turned off (psi=0,
// cgroup.pressure 0), where the file answers EOPNOTSUPP.
func readPSI(dir, name string) (*agentv1.PSIStats, error) {
	text, err := readOptional(dir, name)
	if errors.Is(err, unix.EOPNOTSUPP) {
		return nil, nil
	}
	if err != nil || text == "" {
		return nil, err
	}
	st, err := parsePSI(text)
	if err != nil {
		return nil, fmt.Errorf("parse %s: %w", filepath.Join(dir, name), err)
	}
	return st, nil
}

func parsePSI(text string) (*agentv1.PSIStats, error) {
	st := &agentv1.PSIStats{}
	sc := bufio.NewScanner(strings.NewReader(text))
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) == 0 {
			continue
		}
		d := &agentv1.PSIData{}
		switch fields[0] {
		case "some":
			st.Some = d
		case "full":
			st.Full = d
		default:
			return nil, fmt.Errorf("line %q: want \"some\" or \"full\" first", sc.Text())
		}
		for _, f := range fields[1:] {
			k, v, ok := strings.Cut(f, "=")
			if !ok {
				return nil, fmt.Errorf("line %q: field %q is not key=value", sc.Text(), f)
			}
			var err error
			switch k {
			case "avg10":
				d.Avg10, err = strconv.ParseFloat(v, 64)
			case "avg60":
				d.Avg60, err = strconv.ParseFloat(v, 64)
			case "avg300":
				d.Avg300, err = strconv.ParseFloat(v, 64)
			case "total":
				d.Total, err = strconv.ParseUint(v, 10, 64)
			}
			if err != nil {
				return nil, fmt.Errorf("line %q: %w", sc.Text(), err)
			}
		}
	}
	return st, sc.Err()
}

func readIOStat(dir string) ([]*agentv1.IOEntry, error) {
	text, err := readOptional(dir, "io.stat")
	if err != nil {
		return nil, err
	}
	entries, err := parseIOStat(text)
	if err != nil {
		return nil, fmt.Errorf("parse %s: %w", filepath.Join(dir, "io.stat"), err)
	}
	return entries, nil
}

// parseIOStat parses io.stat lines: "MAJ:MIN rbytes=N wbytes=N rios=N
// wios=N dbytes=N dios=N"; unknown keys are skipped.
func parseIOStat(text string) ([]*agentv1.IOEntry, error) {
	var out []*agentv1.IOEntry
	sc := bufio.NewScanner(strings.NewReader(text))
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) == 0 {
			continue
		}
		maj, min, ok := strings.Cut(fields[0], ":")
		if !ok {
			return nil, fmt.Errorf("line %q: want MAJ:MIN first", sc.Text())
		}
		e := &agentv1.IOEntry{}
		var err error
		if e.Major, err = strconv.ParseUint(maj, 10, 64); err != nil {
			return nil, fmt.Errorf("line %q: %w", sc.Text(), err)
		}
		if e.Minor, err = strconv.ParseUint(min, 10, 64); err != nil {
			return nil, fmt.Errorf("line %q: %w", sc.Text(), err)
		}
		for _, kv := range fields[1:] {
			k, v, ok := strings.Cut(kv, "=")
			if !ok {
				return nil, fmt.Errorf("line %q: field %q is not key=value", sc.Text(), kv)
			}
			n, err := strconv.ParseUint(v, 10, 64)
			if err != nil {
				return nil, fmt.Errorf("line %q: %w", sc.Text(), err)
			}
			switch k {
			case "rbytes":
				e.Rbytes = n
			case "wbytes":
				e.Wbytes = n
			case "rios":
				e.Rios = n
			case "wios":
				e.Wios = n
			}
		}
		out = append(out, e)
	}
	return out, sc.Err()
}
