package agent

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"

	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
)

// ReadGuestInfo describes the guest from the kernel's files under root ("/"
// in the guest; a directory laid out like it in tests). It fills everything
// the kernel tells; the agent's own fields (version, init time) are the
// caller's.
func ReadGuestInfo(root string) (*agentv1.GuestInfo, error) {
	read := func(rel string) (string, error) {
		b, err := os.ReadFile(filepath.Join(root, rel))
		if err != nil {
			return "", err
		}
		return strings.TrimSpace(string(b)), nil
	}
	info := &agentv1.GuestInfo{}
	var err error
	for _, f := range []struct {
		rel string
		dst *string
	}{
		{"proc/sys/kernel/osrelease", &info.KernelRelease},
		{"proc/sys/kernel/version", &info.KernelVersion},
		{"proc/sys/kernel/random/boot_id", &info.BootId},
		{"proc/sys/kernel/hostname", &info.Hostname},
		{"proc/cmdline", &info.KernelCmdline},
	} {
		if *f.dst, err = read(f.rel); err != nil {
			return nil, fmt.Errorf("read guest info: %w", err)
		}
	}

	if err := withFile(root, "proc/meminfo", func(r io.Reader) error {
		info.MemoryTotalBytes, info.MemoryAvailableBytes, err = parseMeminfo(r)
		return err
	}); err != nil {
		return nil, err
	}

	uptime, err := read("proc/uptime")
	if err != nil {
		return nil, fmt.Errorf("read guest info: %w", err)
	}
	d, err := parseUptime(uptime)
	if err != nil {
		return nil, fmt.Errorf("parse /proc/uptime %q: %w", uptime, err)
	}
	info.Uptime = durationpb.New(d)

	online, err := read("sys/devices/system/cpu/online")
	if err != nil {
		return nil, fmt.Errorf("read guest info: %w", err)
	}
	if info.Vcpus, err = countCPUList(online); err != nil {
		return nil, fmt.Errorf("parse online cpus %q: %w", online, err)
	}

	if err := withFile(root, "proc/self/mountinfo", func(r io.Reader) error {
		info.PivotRoot, err = rootCanPivot(r)
		return err
	}); err != nil {
		return nil, err
	}
	return info, nil
}

func withFile(root, rel string, parse func(io.Reader) error) error {
	f, err := os.Open(filepath.Join(root, rel))
	if err != nil {
		return fmt.Errorf("read guest info: %w", err)
	}
	defer f.Close()
	if err := parse(f); err != nil {
		return fmt.Errorf("parse /%s: %w", rel, err)
	}
	return nil
}

// parseMeminfo returns MemTotal and MemAvailable in bytes; the kernel prints
// them in KiB despite the "kB" unit.
func parseMeminfo(r io.Reader) (total, available uint64, err error) {
	var haveTotal bool
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		name, rest, ok := strings.Cut(sc.Text(), ":")
		if !ok || (name != "MemTotal" && name != "MemAvailable") {
			continue
		}
		fields := strings.Fields(rest)
		if len(fields) == 0 {
			return 0, 0, fmt.Errorf("%s has no value", name)
		}
		kib, err := strconv.ParseUint(fields[0], 10, 64)
		if err != nil {
			return 0, 0, fmt.Errorf("%s: %w", name, err)
		}
		if name == "MemTotal" {
			total, haveTotal = kib*1024, true
		} else {
			available = kib * 1024
		}
	}
	if err := sc.Err(); err != nil {
		return 0, 0, err
	}
	if !haveTotal {
		return 0, 0, errors.New("no MemTotal line")
	}
	return total, available, nil
}

// parseUptime reads the first field of /proc/uptime: seconds with two
// decimals.
func parseUptime(s string) (time.Duration, error) {
	fields := strings.Fields(s)
	if len(fields) == 0 {
		return 0, errors.New("empty")
	}
	if strings.ContainsAny(fields[0], "+-") {
		return 0, fmt.Errorf("bad seconds %q", fields[0])
	}
	d, err := time.ParseDuration(fields[0] + "s")
	if err != nil {
		return 0, fmt.Errorf("bad seconds %q: %w", fields[0], err)
	}
	return d, nil
}

// countCPUList counts the CPUs in a kernel CPU list such as "0-3,6,8-9".
func countCPUList(s string) (uint32, error) {
	var n uint32
	for part := range strings.SplitSeq(strings.TrimSpace(s), ",") {
		if part == "" {
			continue
		}
		lo, hi, isRange := strings.Cut(part, "-")
		first, err := strconv.ParseUint(lo, 10, 32)
		if err != nil {
			return 0, err
		}
		last := first
		if isRange {
			if last, err = strconv.ParseUint(hi, 10, 32); err != nil {
				return 0, err
			}
		}
		if last < first {
			return 0, fmt.Errorf("range %q runs backwards", part)
		}
		n += uint32(last - first + 1)
	}
	return n, nil
}
