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
	// Containers is the cgroup directory every container's cgroup is below, in a cgroup2 hierarchy whose
	// parent directory has the pids controller.
	Containers string

	mu sync.Mutex
}

// ThreadsReserved is how many of the guest's threads no container may take: the agent's (a few tens, more while
// it serves many calls, and an exec's child until it joins its container's cgroup) and the kernel's own (about
// 60 in a guest of two vCPUs, and the workers it starts as it needs them).
const ThreadsReserved = 256

// maxThreadsAsked is what Raise writes: the most the kernel takes (FUTEX_TID_MASK), which it lowers to what the
// guest's RAM allows.
const maxThreadsAsked = "1073741823"

// Reserve sets the containers' share of the guest's threads: kernel.threads-max less ThreadsReserved. It makes
// the containers' cgroup if need be.
func (t *GuestThreads) Reserve() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.reserve()
}

// Raise has the kernel derive its ceiling on threads from the RAM the guest has now (it sets it once, at boot,
// from the RAM it booted with: an eighth of it for thread stacks), and raises the containers' share with it.
func (t *GuestThreads) Raise() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if err := os.WriteFile(t.ThreadsMax, []byte(maxThreadsAsked), 0); err != nil {
		return fmt.Errorf("raise the guest's ceiling on threads to what its added memory allows: %w", err)
	}
	return t.reserve()
}

func (t *GuestThreads) reserve() error {
	b, err := os.ReadFile(t.ThreadsMax)
	if err != nil {
		return fmt.Errorf("keep threads back for the guest: %w", err)
	}
	max, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || max <= 2*ThreadsReserved {
		return fmt.Errorf("keep threads back for the guest: kernel.threads-max is %q, want a number above %d", strings.TrimSpace(string(b)), 2*ThreadsReserved)
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
