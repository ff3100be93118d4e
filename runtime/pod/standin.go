package pod

import (
	"errors"
	"fmt"
	"os"
	"slices"

	"github.com/containerd/errdefs"
	"github.com/sirupsen/logrus"

	"github.com/kiln-runtime/kiln/runtime/network"
	"github.com/kiln-runtime/kiln/runtime/standin"
)

// standIns are the pod's containers' stand-ins on the host (runtime/standin), whose pids containerd gets for
// them.
type standIns struct {
	threads *standin.Pool
	// own is the pod's network namespace when it mirrors none (its spec asked for a new one that no hook
	// configured): an empty one its first stand-in made, which the others join, let go once the last one ends
	// (a spare's warm-up container has one before the pod it serves has a network).
	own  *os.File
	byID map[string]*standin.Thread
}

// startStandIn starts container id's stand-in with root as its root directory, in the pod's network namespace,
// and keeps it, so that Close ends it even while the container's create goes on.
func (p *Pod) startStandIn(id, root string) (*standin.Thread, error) {
	p.bundlesMu.Lock()
	defer p.bundlesMu.Unlock()
	s := &p.standIns
	if p.isClosing() {
		return nil, fmt.Errorf("start the stand-in of container %s: the pod is stopping", id)
	}
	ns := p.net.ns
	if ns == nil {
		ns = s.own
	}
	t, err := s.threads.Start(root, ns)
	if err != nil {
		return nil, fmt.Errorf("container %s: %w", id, err)
	}
	if ns == nil {
		f, err := t.NetNS()
		if err != nil {
			_ = t.Close()
			return nil, fmt.Errorf("start the stand-in of container %s: open its network namespace: %w", id, err)
		}
		s.own = f
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
	if len(p.standIns.byID) == 0 && p.standIns.own != nil {
		_ = p.standIns.own.Close()
		p.standIns.own = nil
	}
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
	if p.standIns.own != nil {
		_ = p.standIns.own.Close()
		p.standIns.own = nil
	}
	return errors.Join(errs...)
}

// CheckLateNetwork refuses to start container id when the pod's network namespace has interfaces the VM did
// not get and no container of the pod has started yet: `ctr run --cni` runs CNI on /proc/<task pid>/ns/net
// between the create and the start, after the VM read the namespace, and the guest would run without that
// network, saying nothing. Once the pod runs, such an interface (a controller adding networks to a running pod)
// is logged instead: refusing would keep every later start and restart of the pod's containers from running.
func (p *Pod) CheckLateNetwork(id string) error {
	p.bundlesMu.Lock()
	defer p.bundlesMu.Unlock()
	ns := p.net.ns
	if ns == nil {
		ns = p.standIns.own
	}
	if ns == nil || p.isClosing() {
		return nil
	}
	names, err := network.Interfaces(ns)
	if err != nil {
		p.log.WithError(err).WithField("container", id).Warn("could not check the pod's network namespace for interfaces the VM lacks")
		return nil
	}
	var late []string
	for _, name := range names {
		if p.net.mirror == nil || !slices.ContainsFunc(p.net.mirror.Interfaces, func(i network.Interface) bool { return i.Name == name }) {
			late = append(late, name)
		}
	}
	if len(late) == 0 {
		return nil
	}
	if p.started.Load() {
		p.log.WithFields(logrus.Fields{"container": id, "interfaces": late}).Warn("the pod's network namespace has interfaces its VM did not get (added after its first container was created)")
		return nil
	}
	return fmt.Errorf("%w: container %s: interfaces %v were added to its network namespace after its create (as `ctr run --cni` does): a Kiln VM gets the interfaces its namespace has when the pod's first container is created; configure them in a createRuntime hook (as nerdctl does), or name a namespace configured beforehand (ctr run --with-ns network:<path>)",
		errdefs.ErrFailedPrecondition, id, late)
}
