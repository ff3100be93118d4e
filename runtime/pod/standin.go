package pod

import (
	"errors"
	"fmt"
	"os"

	"github.com/containerd/errdefs"

	"github.com/kiln-runtime/kiln/runtime/network"
	"github.com/kiln-runtime/kiln/runtime/standin"
)

// standIns are the pod's containers' stand-ins on the host (runtime/standin), whose pids containerd gets for
// them.
type standIns struct {
	threads *standin.Pool
	// netns is the pod's network namespace, opened once for every stand-in to join: the one the pod mirrors, or
	// an empty one of the pod's own, which its first stand-in made. Held by descriptor, so that a path that
	// later names another namespace (a holder's pid reused) or none (`ip netns del`) changes nothing.
	netns *os.File
	byID  map[string]*standin.Thread
}

// startStandIn starts container id's stand-in with root as its root directory, and keeps it, so that Close ends
// it even while the container's create goes on.
func (p *Pod) startStandIn(id, root string) (*standin.Thread, error) {
	p.bundlesMu.Lock()
	defer p.bundlesMu.Unlock()
	s := &p.standIns
	if p.isClosing() {
		return nil, fmt.Errorf("start the stand-in of container %s: the pod is stopping", id)
	}
	if s.netns == nil && p.net.path != "" {
		f, err := os.Open(p.net.path)
		if err != nil {
			return nil, fmt.Errorf("start the stand-in of container %s: open the pod's network namespace: %w", id, err)
		}
		s.netns = f
	}
	t, err := s.threads.Start(root, s.netns)
	if err != nil {
		return nil, fmt.Errorf("container %s: %w", id, err)
	}
	if s.netns == nil {
		f, err := t.NetNS()
		if err != nil {
			_ = t.Close()
			return nil, fmt.Errorf("start the stand-in of container %s: open its network namespace: %w", id, err)
		}
		s.netns = f
	}
	s.byID[id] = t
	return t, nil
}

// endStandIn ends container id's stand-in, if it has one; once it returns without error, nothing of the pod's
// holds the container's root file system.
func (p *Pod) endStandIn(id string) error {
	p.bundlesMu.Lock()
	t := p.standIns.byID[id]
	delete(p.standIns.byID, id)
	p.bundlesMu.Unlock()
	if t == nil {
		return nil
	}
	return t.Close()
}

// endStandIns ends every stand-in of the pod, and lets its network namespace go.
func (p *Pod) endStandIns() error {
	p.bundlesMu.Lock()
	defer p.bundlesMu.Unlock()
	var errs []error
	for id, t := range p.standIns.byID {
		errs = append(errs, t.Close())
		delete(p.standIns.byID, id)
	}
	if p.standIns.netns != nil {
		_ = p.standIns.netns.Close()
		p.standIns.netns = nil
	}
	return errors.Join(errs...)
}

// CheckLateNetwork refuses to start container id when the pod's network namespace is its own (its spec asked
// for a new one and no hook configured it) and has been given interfaces since the VM read it: `ctr run --cni`
// runs CNI on /proc/<task pid>/ns/net between the create and the start, and the guest would run without that
// network, saying nothing.
func (p *Pod) CheckLateNetwork(id string) error {
	if p.net.path != "" {
		return nil
	}
	p.bundlesMu.Lock()
	defer p.bundlesMu.Unlock()
	if p.standIns.netns == nil {
		return nil
	}
	names, err := network.Interfaces(p.standIns.netns)
	if err != nil {
		return fmt.Errorf("container %s: %w", id, err)
	}
	if len(names) > 0 {
		return fmt.Errorf("%w: container %s: interfaces %v were added to its network namespace after its create (as `ctr run --cni` does): a Kiln VM gets the interfaces its namespace has when the pod's first container is created; configure them in a createRuntime hook (as nerdctl does), or name a namespace configured beforehand (ctr run --with-ns network:<path>)",
			errdefs.ErrFailedPrecondition, id, names)
	}
	return nil
}
