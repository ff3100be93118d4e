package network

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/kiln-runtime/kiln/netdump"
)

// deviceTimeout bounds the wait for a virtio-net device to show up: the driver binds while the agent starts, so
// a device missing after this long is not coming.
const deviceTimeout = 10 * time.Second

// waitForMAC returns the link with the given MAC in h's namespace (the calling thread's), waiting for the driver
// to bind it. It follows the kernel's link notifications rather than polling: a NIC hot-plugged into a running
// guest (a spare's) binds tens of milliseconds after the host's request, and the pod's start waits for it.
func waitForMAC(ctx context.Context, h *netlink.Handle, mac net.HardwareAddr) (netlink.Link, error) {
	ctx, cancel := context.WithTimeout(ctx, deviceTimeout)
	defer cancel()
	// Subscribed before the listing, so that a device bound in between is not missed.
	updates := make(chan netlink.LinkUpdate, 16)
	done := make(chan struct{})
	var watchErr error
	errs := make(chan error, 1)
	if err := netlink.LinkSubscribeWithOptions(updates, done, netlink.LinkSubscribeOptions{
		ErrorCallback: func(err error) {
			select {
			case errs <- err:
			default:
			}
		},
	}); err != nil {
		return nil, fmt.Errorf("follow network devices: %w", err)
	}
	defer func() {
		close(done)
		// The subscription's reader closes updates once its socket is closed; until then it may be sending.
		go func() {
			for range updates {
			}
		}()
	}()
	if l, err := linkWithMAC(h, mac); l != nil || err != nil {
		return l, err
	}
	for {
		select {
		case u, ok := <-updates:
			if !ok {
				// The subscription failed (a receive error such as ENOBUFS ends it): list until the deadline.
				return pollForMAC(ctx, h, mac, watchErr)
			}
			if u.Header.Type == unix.RTM_NEWLINK && u.Link != nil && bytes.Equal(u.Link.Attrs().HardwareAddr, mac) {
				l, err := h.LinkByIndex(u.Link.Attrs().Index)
				if err != nil {
					return nil, fmt.Errorf("network device with MAC %s: %w", mac, err)
				}
				return l, nil
			}
		case err := <-errs:
			watchErr = err
		case <-ctx.Done():
			return nil, fmt.Errorf("no network device with MAC %s in the guest: %w", mac, errors.Join(ctx.Err(), watchErr))
		}
	}
}

// linkWithMAC is the link with the given MAC in h's namespace, nil when there is none.
func linkWithMAC(h *netlink.Handle, mac net.HardwareAddr) (netlink.Link, error) {
	links, err := netdump.Consistent(h.LinkList)
	if err != nil {
		return nil, fmt.Errorf("list links: %w", err)
	}
	for _, l := range links {
		if bytes.Equal(l.Attrs().HardwareAddr, mac) {
			return l, nil
		}
	}
	return nil, nil
}

// pollForMAC lists h's links every pollInterval until the link with the given MAC shows up or ctx ends.
func pollForMAC(ctx context.Context, h *netlink.Handle, mac net.HardwareAddr, watchErr error) (netlink.Link, error) {
	t := time.NewTicker(pollInterval)
	defer t.Stop()
	for {
		if l, err := linkWithMAC(h, mac); l != nil || err != nil {
			return l, err
		}
		select {
		case <-t.C:
		case <-ctx.Done():
			return nil, fmt.Errorf("no network device with MAC %s in the guest: %w", mac, errors.Join(ctx.Err(), watchErr))
		}
	}
}

// pollInterval is how often pollForMAC lists the links.
const pollInterval = 5 * time.Millisecond
