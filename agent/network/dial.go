package network

import (
	"context"
	"errors"
	"fmt"
	"net"

	"github.com/kiln-runtime/kiln/netns"
)

// DialLoopback connects to port on the pod namespace's loopback, 127.0.0.1 first and then ::1, as containerd's
// port forwarding does on a runc pod: a server may listen in one family only. The socket is made inside the pod
// namespace; the agent's own namespace is never dialled. It fails while no container has made the namespace.
func (p *Pod) DialLoopback(ctx context.Context, port uint16) (net.Conn, error) {
	p.mu.Lock()
	created := p.created
	p.mu.Unlock()
	if !created {
		return nil, errors.New("the pod has no network namespace yet")
	}
	// A socket belongs to the namespace of the thread that creates it.
	var c net.Conn
	err := netns.DoPath(p.path, func() error {
		var err error
		c, err = dialLoopback(ctx, port)
		return err
	})
	if err != nil {
		if c != nil {
			c.Close()
		}
		return nil, err
	}
	return c, nil
}

// dialLoopback dials port on 127.0.0.1, then ::1, in the calling thread's namespace.
func dialLoopback(ctx context.Context, port uint16) (net.Conn, error) {
	var d net.Dialer
	c, err4 := d.DialContext(ctx, "tcp4", net.JoinHostPort("127.0.0.1", fmt.Sprint(port)))
	if err4 == nil {
		return c, nil
	}
	c, err6 := d.DialContext(ctx, "tcp6", net.JoinHostPort("::1", fmt.Sprint(port)))
	if err6 != nil {
		return nil, fmt.Errorf("port %d in the pod: %w", port, errors.Join(err4, err6))
	}
	return c, nil
}
