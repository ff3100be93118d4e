// Package accept takes the agent's next connection on a listener, riding out what the guest runs short of for a
// while (descriptors, memory), as ttrpc's server does for the agent's API: a container that exhausts them must not
// end the pod's stdio or port forwarding for good.
package accept

import (
	"context"
	"errors"
	"net"
	"time"

	"golang.org/x/sys/unix"
)

// Bounds of the wait between attempts while the guest is short of resources.
const (
	firstWait = 5 * time.Millisecond
	maxWait   = time.Second
)

// Next returns l's next connection. An error that a lack of resources caused is waited out, retrying with a
// growing wait; any other error, or ctx's end, is returned.
func Next(ctx context.Context, l net.Listener) (net.Conn, error) {
	wait := firstWait
	for {
		c, err := l.Accept()
		if err == nil || !shortOfResources(err) {
			return c, err
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, err
		case <-t.C:
		}
		wait = min(2*wait, maxWait)
	}
}

func shortOfResources(err error) bool {
	return errors.Is(err, unix.EMFILE) || errors.Is(err, unix.ENFILE) || errors.Is(err, unix.ENOBUFS) || errors.Is(err, unix.ENOMEM)
}
