package network

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"time"

	"github.com/vishvananda/netlink"
)

// deviceTimeout bounds the wait for a virtio-net device to show up: the driver binds while the agent starts, so
// a device missing after this long is not coming.
const deviceTimeout = 10 * time.Second

// waitForMAC returns the link with the given MAC in h's namespace, waiting for the driver to bind it.
func waitForMAC(ctx context.Context, h *netlink.Handle, mac net.HardwareAddr) (netlink.Link, error) {
	ctx, cancel := context.WithTimeout(ctx, deviceTimeout)
	defer cancel()
	for delay := time.Millisecond; ; delay = min(2*delay, 100*time.Millisecond) {
		links, err := h.LinkList()
		if err != nil {
			return nil, fmt.Errorf("list links: %w", err)
		}
		for _, l := range links {
			if bytes.Equal(l.Attrs().HardwareAddr, mac) {
				return l, nil
			}
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("no network device with MAC %s in the guest (is virtio_net in the initramfs?): %w", mac, ctx.Err())
		case <-time.After(delay):
		}
	}
}
