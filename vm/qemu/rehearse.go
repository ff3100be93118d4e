package qemu

import (
	"context"
	"errors"
	"fmt"
	"net"
	"slices"
	"time"
)

// Bounds of RehearseNIC's unplug: the guest ejects the device through ACPI, in milliseconds when it is alive.
const (
	rehearsalUnplugTimeout = 10 * time.Second
	rehearsalUnplugPoll    = 10 * time.Millisecond
	// rehearsalCleanupTimeout bounds the unplug and the back end's removal together, whatever the caller's
	// context: a cancelled warm-up must not leave the NIC plugged.
	rehearsalCleanupTimeout = rehearsalUnplugTimeout + 5*time.Second
)

// rehearsalPort is the state of the root port RehearseNIC borrows (the last NIC's).
type rehearsalPort int

const (
	rehearsalFree rehearsalPort = iota
	// rehearsing: RehearseNIC holds the port; PlugNets waits for nothing and refuses.
	rehearsing
	// rehearsalStuck: the throwaway NIC was not unplugged, so the port is lost to PlugNets.
	rehearsalStuck
)

// Hotplug says whether the running VM takes devices (PlugNets, RehearseNIC): it was restored from a template.
func (m *Machine) Hotplug() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.hotplugLocked() == nil
}

// hotplugLocked says why the VM takes no devices, nil when it does. m.mu is held.
func (m *Machine) hotplugLocked() error {
	if !m.restored || m.qmp == nil {
		return errors.New("only a running VM restored from a template has hot-plug")
	}
	return nil
}

// RehearseNIC hot-plugs a throwaway NIC with the given MAC and MTU into a running VM restored from a template, on
// the root port of its last NIC, runs guest (which has the guest configure it), then unplugs it and waits until the
// guest has let it go, so that the port is free for PlugNets again. Its back end is a QEMU hub port with nothing
// else on it: no host device, and what the guest sends goes nowhere. It is a spare's warm-up: under TCG the pod's
// own NICs then find the guest's hot-plug, virtio-net and network configuration paths translated. PlugNets is
// refused meanwhile, and, should the guest not let the NIC go or the back end's removal go unanswered, the port
// stays lost to it.
func (m *Machine) RehearseNIC(ctx context.Context, mac net.HardwareAddr, mtu int, guest func(context.Context) error) error {
	q, idx, err := m.borrowRehearsalPort()
	if err != nil {
		return fmt.Errorf("rehearse a NIC in vm %s: %w", m.cfg.ID, err)
	}
	dev := nicDevice(idx, Net{MAC: mac, MTU: mtu})
	id, netdev := dev["id"].(string), dev["netdev"].(string)
	// Each step of the cleanup has its own bound, whatever the caller's context and the steps before it took.
	cleanup := func(step func(context.Context) error) error {
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), rehearsalCleanupTimeout)
		defer cancel()
		return step(cctx)
	}
	removeBackEnd := func(cctx context.Context) error {
		return q.execute(cctx, "netdev_del", map[string]any{"id": netdev}, nil)
	}
	if err := q.execute(ctx, "netdev_add", map[string]any{"type": "hubport", "id": netdev, "hubid": 0}, nil); err != nil {
		// QEMU may have added it after all, and a back end left behind would refuse the next NIC of this port.
		// Its answer to the removal of one it did not add says no more; no answer leaves the port lost.
		m.returnRehearsalPort(!unanswered(err) || !unanswered(cleanup(removeBackEnd)))
		return fmt.Errorf("rehearse a NIC in vm %s: %w", m.cfg.ID, err)
	}
	var unplugErr error
	err = q.execute(ctx, "device_add", dev, nil)
	plugged := err == nil
	if unanswered(err) {
		// QEMU goes on with a command given up on, and answers a monitor's commands in order: a look after it
		// sees whether it plugged the device.
		unplugErr = cleanup(func(cctx context.Context) (lerr error) {
			plugged, lerr = hasDevice(cctx, q, id)
			return lerr
		})
	}
	if plugged {
		if err == nil {
			err = guest(ctx)
		}
		// The device goes whatever the guest made of it; an unplug the guest does not finish is an error.
		unplugErr = cleanup(func(cctx context.Context) error { return unplug(cctx, q, id) })
	}
	derr := cleanup(removeBackEnd)
	m.returnRehearsalPort(unplugErr == nil && derr == nil)
	if err = errors.Join(err, unplugErr, derr); err != nil {
		return fmt.Errorf("rehearse a NIC in vm %s: %w", m.cfg.ID, err)
	}
	return nil
}

// borrowRehearsalPort takes the last NIC root port for a rehearsal and returns the QMP connection and the NIC
// index whose port it is.
func (m *Machine) borrowRehearsalPort() (*qmpConn, int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.hotplugLocked(); err != nil {
		return nil, 0, err
	}
	idx := maxCloneNets - 1
	switch {
	case m.rehearsal != rehearsalFree:
		return nil, 0, errors.New("the root port a rehearsal takes is in use or lost")
	case m.plugging:
		return nil, 0, errors.New("NICs are being hot-plugged")
	case len(m.cfg.Nets)+m.plugged > idx:
		return nil, 0, errors.New("the root port a rehearsal would take holds a NIC")
	}
	m.rehearsal = rehearsing
	return m.qmp, idx, nil
}

func (m *Machine) returnRehearsalPort(unplugged bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if unplugged {
		m.rehearsal = rehearsalFree
	} else {
		m.rehearsal = rehearsalStuck
	}
}

// unplug asks for the device id's removal and waits until QEMU has removed it: after the guest has ejected it.
func unplug(ctx context.Context, q *qmpConn, id string) error {
	if err := q.execute(ctx, "device_del", map[string]any{"id": id}, nil); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, rehearsalUnplugTimeout)
	defer cancel()
	for {
		present, err := hasDevice(ctx, q, id)
		if err != nil {
			return fmt.Errorf("wait for its removal: %w", err)
		}
		if !present {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("device %s: the guest did not release it within %v: %w", id, rehearsalUnplugTimeout, ctx.Err())
		case <-time.After(rehearsalUnplugPoll):
		}
	}
}

// unanswered says whether err is a QMP command's caller giving up on QEMU's answer (its context ended, or run's
// bound for a context without a deadline) rather than QEMU's answer: QEMU may still carry the command out.
func unanswered(err error) bool {
	return errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded)
}

// hasDevice says whether QEMU has the device id (one given an id by device_add).
func hasDevice(ctx context.Context, q *qmpConn, id string) (bool, error) {
	var props []qomProperty
	if err := q.execute(ctx, "qom-list", map[string]any{"path": "/machine/peripheral"}, &props); err != nil {
		return false, fmt.Errorf("look for device %s: %w", id, err)
	}
	return slices.ContainsFunc(props, func(p qomProperty) bool { return p.Name == id }), nil
}

// qomProperty is one entry of QMP qom-list's answer: a child device is a property named by its id.
type qomProperty struct {
	Name string `json:"name"`
}
