package network

import (
	"context"
	"errors"
	"fmt"
	"net"
	"runtime"

	"github.com/vishvananda/netns"
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
	ns, err := netns.GetFromPath(p.path)
	if err != nil {
		return nil, fmt.Errorf("open pod network namespace %s: %w", p.path, err)
	}
	defer ns.Close()
	type result struct {
		c   net.Conn
		err error
	}
	done := make(chan result, 1)
	go func() {
		// A socket belongs to the namespace of the thread that creates it. The thread is never unlocked: it ends
		// with the goroutine rather than going back to the scheduler in the pod's namespace.
		runtime.LockOSThread()
		if err := netns.Set(ns); err != nil {
			done <- result{err: fmt.Errorf("enter pod network namespace: %w", err)}
			return
		}
		var d net.Dialer
		c, err4 := d.DialContext(ctx, "tcp4", net.JoinHostPort("127.0.0.1", fmt.Sprint(port)))
		if err4 == nil {
			done <- result{c: c}
			return
		}
		c, err6 := d.DialContext(ctx, "tcp6", net.JoinHostPort("::1", fmt.Sprint(port)))
		if err6 != nil {
			done <- result{err: fmt.Errorf("port %d in the pod: %w", port, errors.Join(err4, err6))}
			return
		}
		done <- result{c: c}
	}()
	r := <-done
	return r.c, r.err
}
