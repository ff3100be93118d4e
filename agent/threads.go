package agent

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"github.com/kiln-runtime/kiln/kernfs"
)

// GuestThreads shares the guest's threads between its containers and the guest itself. The kernel refuses a
// fork past kernel.threads-max whoever forks (kernel threads too, and root), and the agent, which is PID 1, ends
// and the guest with it when the Go runtime cannot start a thread it needs: a container with no pids limit of
// its own would take its whole pod down by forking until refused (about 2000 threads in 256 MiB). Every
// container's cgroup is below one parent whose pids.max keeps threads back for the agent and the kernel
// (reserved).
type GuestThreads struct {
	// ThreadsMax is the kernel.threads-max file.
	ThreadsMax string
	// PidMax is the kernel.pid_max file: a thread needs a pid too.
	PidMax string
	// Meminfo is /proc/meminfo, whose MemTotal Raise derives the ceiling on threads from.
	Meminfo string
	// PossibleCPUs is the CPU list file of every CPU the guest may bring online
	// (/sys/devices/system/cpu/possible): the kernel keeps threads of its own on each.
	PossibleCPUs string
	// Containers is the cgroup directory every container's cgroup is below, in a cgroup2 hierarchy whose
	// parent directory has the pids controller.
	Containers string

	mu sync.Mutex
	// limited: Reserve has set the containers' limit, which Raise then raises. Before, there is no cgroup
	// hierarchy to write to (memory may be added before the guest's setup mounted it).
	limited bool
}

// Threads no container may take: the agent's (a few tens, more while it serves many calls, and an exec's child
// until it joins its container's cgroup), the kernel's that are not per CPU, and per CPU the kernel's own
// (cpuhp, migration, ksoftirqd, two kworkers, and workers it starts as it needs them).
const (
	threadsReservedBase   = 256
	threadsReservedPerCPU = 16
)

// pidMax is what the guest's kernel.pid_max is raised to, as systemd raises a host's: the most 64-bit Linux
// takes, where it is not built small. The kernel's default (32768 with few CPUs) would bind before threads-max in
// a guest of more than about 4 GiB.
const pidMax = 4194304

// pidsReservedByKernel are the pids the kernel hands out no more once the counter wrapped (RESERVED_PIDS).
const pidsReservedByKernel = 300

// minThreads is the fewest threads a guest must have to share them: the kernel's own floor is 20.
const minThreads = 64

// threadStackShare is the kernel's share of RAM per thread, in KiB: it lets thread stacks (16 KiB each on
// x86-64) take an eighth of the RAM (set_max_threads).
const threadStackShare = 16 * 8

// maxThreads is the most kernel.threads-max takes (FUTEX_TID_MASK).
const maxThreads = 1<<30 - 1

// Reserve raises kernel.pid_max and sets the containers' share of the guest's threads: the ceiling on threads
// (or on pids, the lower) less what is reserved. It makes the containers' cgroup if need be.
func (t *GuestThreads) Reserve() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if pids, err := readInt(t.PidMax); err != nil {
		return fmt.Errorf("keep threads back for the guest: %w", err)
	} else if pids < pidMax {
		// A kernel built small (CONFIG_BASE_SMALL, as Kiln's guest kernel is) takes no more than 32768.
		if err := kernfs.Write(t.PidMax, strconv.Itoa(pidMax)); err != nil && !errors.Is(err, syscall.EINVAL) {
			return fmt.Errorf("keep threads back for the guest: raise kernel.pid_max: %w", err)
		}
	}
	if err := t.limit(); err != nil {
		return err
	}
	t.limited = true
	return nil
}

// Raise sets the guest's ceiling on threads from the RAM it has now, as the kernel sets it once at boot from the
// RAM it booted with (an eighth of it for thread stacks; a write to threads-max is taken as it is, not derived),
// and raises the containers' share with it once Reserve has set it. It never lowers the ceiling.
func (t *GuestThreads) Raise() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	f, err := os.Open(t.Meminfo)
	if err != nil {
		return fmt.Errorf("raise the guest's ceiling on threads: %w", err)
	}
	total, _, err := parseMeminfo(f)
	f.Close()
	if err != nil {
		return fmt.Errorf("raise the guest's ceiling on threads: %s: %w", t.Meminfo, err)
	}
	now, err := readInt(t.ThreadsMax)
	if err != nil {
		return fmt.Errorf("raise the guest's ceiling on threads: %w", err)
	}
	if want := min(total/1024/threadStackShare, maxThreads); want > uint64(now) {
		if err := kernfs.Write(t.ThreadsMax, strconv.FormatUint(want, 10)); err != nil {
			return fmt.Errorf("raise the guest's ceiling on threads to what its added memory allows: %w", err)
		}
	}
	if !t.limited {
		return nil
	}
	// Set again even where the ceiling was there already: an earlier call may have raised it and failed after.
	return t.limit()
}

// reserved is how many threads no container may take in this guest.
func (t *GuestThreads) reserved() (int, error) {
	cpus, err := readCPUList(t.PossibleCPUs)
	if err != nil {
		return 0, err
	}
	if len(cpus) == 0 {
		return 0, fmt.Errorf("%s: no CPUs listed", t.PossibleCPUs)
	}
	return threadsReservedBase + threadsReservedPerCPU*len(cpus), nil
}

// limit sets the containers' cgroup's pids.max.
func (t *GuestThreads) limit() error {
	threads, err := readInt(t.ThreadsMax)
	if err != nil {
		return fmt.Errorf("keep threads back for the guest: %w", err)
	}
	pids, err := readInt(t.PidMax)
	if err != nil {
		return fmt.Errorf("keep threads back for the guest: %w", err)
	}
	reserved, err := t.reserved()
	if err != nil {
		return fmt.Errorf("keep threads back for the guest: %w", err)
	}
	most := min(threads, pids-pidsReservedByKernel)
	if most < minThreads {
		return fmt.Errorf("keep threads back for the guest: kernel.threads-max %d and kernel.pid_max %d leave %d threads, want at least %d", threads, pids, most, minThreads)
	}
	// A small guest of many vCPUs (64 MiB, or 256 MiB with vcpus_max = 64) has fewer threads than twice the
	// reserve: the containers get half.
	reserved = min(reserved, most/2)
	// pids.max exists in a cgroup only once its parent hands the controller down.
	control := filepath.Join(filepath.Dir(t.Containers), "cgroup.subtree_control")
	if err := os.WriteFile(control, []byte("+pids"), 0); err != nil {
		return fmt.Errorf("keep threads back for the guest: enable the pids controller in %s (a guest kernel needs CONFIG_CGROUP_PIDS): %w", control, err)
	}
	if err := os.Mkdir(t.Containers, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
		return fmt.Errorf("keep threads back for the guest: %w", err)
	}
	if err := os.WriteFile(filepath.Join(t.Containers, "pids.max"), []byte(strconv.Itoa(most-reserved)), 0); err != nil {
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
