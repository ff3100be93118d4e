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
	target, err := netns.GetFromPath(p.path)
	if err != nil {
		return nil, fmt.Errorf("open pod network namespace %s: %w", p.path, err)
	}
	defer target.Close()
	type result struct {
		c   net.Conn
		err error
	}
	done := make(chan result, 1)
	go func() {
		// A socket belongs to the namespace of the thread that creates it. The thread goes back to the agent's
		// namespace afterwards rather than ending (as a thread left locked does): libcontainer starts a container's
		// init with a parent-death signal, which the kernel sends when the thread that forked it ends, and any
		// thread may be that one. Only when the way back fails does the thread stay locked and end.
		runtime.LockOSThread()
		home, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			done <- result{err: fmt.Errorf("open the agent's network namespace: %w", err)}
			return
		}
		defer home.Close()
		if err := netns.Set(target); err != nil {
			runtime.UnlockOSThread()
			done <- result{err: fmt.Errorf("enter pod network namespace: %w", err)}
			return
		}
		c, err := dialLoopback(ctx, port)
		if serr := netns.Set(home); serr != nil {
			if c != nil {
				c.Close()
			}
			done <- result{err: fmt.Errorf("return from pod network namespace: %w", serr)}
			return
		}
		runtime.UnlockOSThread()
		done <- result{c, err}
	}()
	r := <-done
	return r.c, r.err
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
