package pod

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/kiln-runtime/kiln/runtime/bundle"
	"github.com/kiln-runtime/kiln/runtime/hostcgroup"
)

// A runc pod's processes each have their container's process.oomScoreAdj (kubelet's, by QoS class: BestEffort
// 1000, Burstable 2 to 999, Guaranteed -997, the sandbox -998), and the host's OOM killer picks among them. A Kiln
// pod's memory is its VM's, held by QEMU (and virtiofsd), which would otherwise keep the shim's score, containerd's
// plus one (-998 under systemd): a BestEffort pod would be the last thing a host short of memory kills. The VM's
// processes take the highest score among the pod's containers instead, since the VM goes with the most expendable
// of them. The shim keeps its own, as runc's shim does.

// SpareOOMScoreAdj is the oom_score_adj of a spare shim and of its VM while they wait for a task: holding an idle
// pod's memory for no pod yet, they are the first thing a host short of memory should kill (a spare that dies is
// replaced, or its task boots a VM). The shim that takes a task gets containerd's score plus one back from its
// `start` (containerd's shim library), and its VM the shim's (TakeShimOOMScore).
const SpareOOMScoreAdj = 1000

// ForSpare gives this process, a spare shim about to boot its VM, SpareOOMScoreAdj: the VM's processes inherit it.
// Going back needs no privilege: the kernel lets a process lower its score as far as the one it inherited.
func ForSpare() error {
	return setOOMScoreAdj([]int{os.Getpid()}, SpareOOMScoreAdj)
}

// TakeShimOOMScore gives the VM's processes the shim's own oom_score_adj, for a spare's VM that a task took: they
// no longer wait for a task, and their containers' scores (followOOMScoresLocked) come on top as they are created.
func (p *Pod) TakeShimOOMScore() error {
	b, err := os.ReadFile("/proc/self/oom_score_adj")
	if err != nil {
		return err
	}
	adj, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return fmt.Errorf("the shim's oom_score_adj %q: %w", b, err)
	}
	return setOOMScoreAdj(p.VMProcesses(), adj)
}

// followOOMScoresLocked gives the VM's processes, and every process below them, the highest oomScoreAdj the pod's
// containers' specs name; none named leaves them as they are. p.bundlesMu is held, so that two changes of the
// pod's containers write in the order they were made.
func (p *Pod) followOOMScoresLocked() {
	adj, ok := highestOOMScoreAdj(p.bundles)
	if !ok {
		return
	}
	if err := setOOMScoreAdj(p.VMProcesses(), adj); err != nil {
		p.log.WithError(err).Warn("the VM's processes keep their standing with the host's OOM killer")
	}
}

// highestOOMScoreAdj is the highest process.oomScoreAdj among bundles' specs; false when none names one.
func highestOOMScoreAdj(bundles map[string]*bundle.Bundle) (int, bool) {
	adj, ok := 0, false
	for _, b := range bundles {
		if b == nil || b.Spec == nil || b.Spec.Process == nil || b.Spec.Process.OOMScoreAdj == nil {
			continue
		}
		if v := *b.Spec.Process.OOMScoreAdj; !ok || v > adj {
			adj, ok = v, true
		}
	}
	return adj, ok
}

// setOOMScoreAdj writes adj as the oom_score_adj of each process of roots and every process below it (virtiofsd's
// sandbox runs its work in a child). A process that has just exited is not an error.
func setOOMScoreAdj(roots []int, adj int) error {
	var errs []error
	for _, root := range roots {
		for _, pid := range append([]int{root}, hostcgroup.Descendants(root)...) {
			err := os.WriteFile(fmt.Sprintf("/proc/%d/oom_score_adj", pid), []byte(strconv.Itoa(adj)), 0)
			if err != nil && !errors.Is(err, os.ErrNotExist) {
				errs = append(errs, fmt.Errorf("set the oom_score_adj of process %d to %d: %w", pid, adj, err))
			}
		}
	}
	return errors.Join(errs...)
}
