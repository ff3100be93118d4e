package qemu

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
)

// hostTSCkHz reads the host's TSC frequency from /proc/cpuinfo ("cpu MHz", which is the TSC rate on hosts with
// a constant TSC). Under TCG the guest reads the host's TSC, and the guest kernel's own calibration against the
// emulated PIT fails when the host is busy, which hangs the boot; passing tsc_early_khz skips that calibration.
func hostTSCkHz() (int, error) {
	f, err := os.Open("/proc/cpuinfo")
	if err != nil {
		return 0, err
	}
	defer f.Close()
	return parseCPUMHz(f)
}

func parseCPUMHz(r io.Reader) (int, error) {
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		key, value, ok := strings.Cut(sc.Text(), ":")
		if !ok || strings.TrimSpace(key) != "cpu MHz" {
			continue
		}
		mhz, err := strconv.ParseFloat(strings.TrimSpace(value), 64)
		if err != nil || mhz <= 0 {
			return 0, fmt.Errorf("parse cpu MHz %q", value)
		}
		return int(mhz * 1000), nil
	}
	if err := sc.Err(); err != nil {
		return 0, err
	}
	return 0, fmt.Errorf("no \"cpu MHz\" line in /proc/cpuinfo")
}
