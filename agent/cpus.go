package agent

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"

	"github.com/kiln-runtime/kiln/kernfs"
)

// GuestCPUs brings the guest's vCPUs online through sysfs: the VM has more than its kernel was booted with online
// (maxcpus=), present and offline until the host asks for them. None is ever taken offline: a container's cgroup,
// not the VM's vCPUs, bounds what it uses.
type GuestCPUs struct {
	// Sys is where sysfs is mounted ("/sys").
	Sys string

	mu sync.Mutex
}

// ErrNoCPU is Add's error when the VM has no more vCPUs to bring online.
var ErrNoCPU = errors.New("no more vCPUs")

// ErrNoHotplug is an Add's error (GuestCPUs', GuestMemory's) when the guest kernel was built without the hot-plug
// it needs: nothing can be added to this VM.
var ErrNoHotplug = errors.New("no hot-plug in the guest kernel")

// maxCPU bounds the CPU numbers sysfs lists (the guest kernel's NR_CPUS is 64; x86's most is 8192).
const maxCPU = 8192

// Add brings vCPUs online, lowest number first, until n are, and returns how many are.
func (g *GuestCPUs) Add(n int) (int, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	dir := filepath.Join(g.Sys, "devices/system/cpu")
	present, err := readCPUList(filepath.Join(dir, "present"))
	if err != nil {
		return 0, fmt.Errorf("add vCPUs: %w", err)
	}
	onlineList, err := readCPUList(filepath.Join(dir, "online"))
	if err != nil {
		return 0, fmt.Errorf("add vCPUs: %w", err)
	}
	online := map[int]bool{}
	for _, c := range onlineList {
		online[c] = true
	}
	have := len(online)
	for _, c := range present {
		if have >= n {
			break
		}
		if online[c] {
			continue
		}
		if err := kernfs.Write(filepath.Join(dir, fmt.Sprintf("cpu%d", c), "online"), "1"); err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return have, fmt.Errorf("add vCPUs: bring CPU %d online: %w (CPU hot-plug): %w", c, ErrNoHotplug, err)
			}
			return have, fmt.Errorf("add vCPUs: bring CPU %d online: %w", c, err)
		}
		have++
	}
	if have < n {
		return have, fmt.Errorf("add vCPUs: %w: the VM has %d, %d asked for", ErrNoCPU, have, n)
	}
	return have, nil
}

// readCPUList reads a file in the kernel's CPU list format (sysfs's present, online, possible).
func readCPUList(path string) ([]int, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	list := strings.TrimSpace(string(b))
	cpus, err := parseCPUList(list)
	if err != nil {
		return nil, fmt.Errorf("%s: CPU list %q: %w", path, list, err)
	}
	return cpus, nil
}

// parseCPUList reads the kernel's CPU list format ("0-3,5"), in ascending order, each number below maxCPU.
func parseCPUList(s string) ([]int, error) {
	var cpus []int
	if s == "" {
		return nil, nil
	}
	for _, part := range strings.Split(s, ",") {
		lo, hi, isRange := strings.Cut(part, "-")
		first, err := strconv.Atoi(lo)
		if err != nil {
			return nil, err
		}
		last := first
		if isRange {
			if last, err = strconv.Atoi(hi); err != nil {
				return nil, err
			}
		}
		if first < 0 || last < first || last >= maxCPU || len(cpus) > 0 && first <= cpus[len(cpus)-1] {
			return nil, fmt.Errorf("%q: want ascending CPU numbers below %d", part, maxCPU)
		}
		for c := first; c <= last; c++ {
			cpus = append(cpus, c)
		}
	}
	return cpus, nil
}
