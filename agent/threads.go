package agent

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
)

// GuestThreads shares the guest's threads between its containers and the guest itself. The kernel refuses a
// fork past kernel.threads-max whoever forks (kernel threads too, and root), and the agent, which is PID 1, ends
// and the guest with it when the Go runtime cannot start a thread it needs: a container with no pids limit of
// its own would take its whole pod down by forking until refused (about 2000 threads in 256 MiB). Every
// container's cgroup is below one parent whose pids.max keeps ThreadsReserved back for the agent and the kernel.
type GuestThreads struct {
	// ThreadsMax is the kernel.threads-max file.
	ThreadsMax string
	// PidMax is the kernel.pid_max file: a thread needs a pid too.
	PidMax string
	// Meminfo is /proc/meminfo, whose MemTotal Raise derives the ceiling on threads from.
	Meminfo string
	// Containers is the cgroup directory every container's cgroup is below, in a cgroup2 hierarchy whose
	// parent directory has the pids controller.
	Containers string

	mu sync.Mutex
}

// ThreadsReserved is how many of the guest's threads no container may take: the agent's (a few tens, more while
// it serves many calls, and an exec's child until it joins its container's cgroup) and the kernel's own (about
// 60 in a guest of two vCPUs, and the workers it starts as it needs them).
const ThreadsReserved = 256

// threadStackShare is the kernel's share of RAM per thread, in KiB: it lets thread stacks (16 KiB each on
// x86-64) take an eighth of the RAM (set_max_threads).
const threadStackShare = 16 * 8

// Reserve sets the containers' share of the guest's threads: kernel.threads-max less ThreadsReserved. It makes
// the containers' cgroup if need be.
func (t *GuestThreads) Reserve() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.reserve()
}

// Raise sets the guest's ceiling on threads from the RAM it has now, as the kernel sets it once at boot from the
// RAM it booted with (an eighth of it for thread stacks; a write to threads-max is taken as it is, not derived),
// and raises the containers' share with it. It never lowers the ceiling.
func (t *GuestThreads) Raise() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	total, err := memTotalKiB(t.Meminfo)
	if err != nil {
		return fmt.Errorf("raise the guest's ceiling on threads: %w", err)
	}
	now, err := readInt(t.ThreadsMax)
	if err != nil {
		return fmt.Errorf("raise the guest's ceiling on threads: %w", err)
	}
	if want := total / threadStackShare; want > uint64(now) && want <= maxThreads {
		if err := os.WriteFile(t.ThreadsMax, []byte(strconv.FormatUint(want, 10)), 0); err != nil {
			return fmt.Errorf("raise the guest's ceiling on threads to what its added memory allows: %w", err)
		}
	}
	return t.reserve()
}

// maxThreads is the most kernel.threads-max takes (FUTEX_TID_MASK).
const maxThreads = 1<<30 - 1

func (t *GuestThreads) reserve() error {
	threads, err := readInt(t.ThreadsMax)
	if err != nil {
		return fmt.Errorf("keep threads back for the guest: %w", err)
	}
	pids, err := readInt(t.PidMax)
	if err != nil {
		return fmt.Errorf("keep threads back for the guest: %w", err)
	}
	max := min(threads, pids)
	if max <= 2*ThreadsReserved {
		return fmt.Errorf("keep threads back for the guest: kernel.threads-max %d and kernel.pid_max %d leave no more than %d threads, want above %d", threads, pids, max, 2*ThreadsReserved)
	}
	// pids.max exists in a cgroup only once its parent hands the controller down.
	control := filepath.Join(filepath.Dir(t.Containers), "cgroup.subtree_control")
	if err := os.WriteFile(control, []byte("+pids"), 0); err != nil {
		return fmt.Errorf("keep threads back for the guest: enable the pids controller in %s: %w", control, err)
	}
	if err := os.Mkdir(t.Containers, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
		return fmt.Errorf("keep threads back for the guest: %w", err)
	}
	limit := filepath.Join(t.Containers, "pids.max")
	if err := os.WriteFile(limit, []byte(strconv.Itoa(max-ThreadsReserved)), 0); err != nil {
		return fmt.Errorf("keep threads back for the guest: %w", err)
	}
	return nil
}

// readInt reads a file holding one decimal number, as /proc/sys files do.
func readInt(p string) (int, error) {
	b, err := os.ReadFile(p)
	if err != nil {
		return 0, err
	}
	n, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return 0, fmt.Errorf("%s: %w", p, err)
	}
	return n, nil
}

// memTotalKiB is MemTotal from a /proc/meminfo file.
func memTotalKiB(meminfo string) (uint64, error) {
	b, err := os.ReadFile(meminfo)
	if err != nil {
		return 0, err
	}
	for line := range strings.Lines(string(b)) {
		if rest, ok := strings.CutPrefix(line, "MemTotal:"); ok {
			f := strings.Fields(rest)
			if len(f) != 2 || f[1] != "kB" {
				break
			}
			return strconv.ParseUint(f[0], 10, 64)
		}
	}
	return 0, fmt.Errorf("%s: no MemTotal line in kB", meminfo)
}
