package sandbox

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"time"

	"github.com/containerd/ttrpc"
)

// waitMethods are the agent calls that wait for the guest to do something (a process to exit) rather than ask
// it something: bounded only by their caller's context, never by the request timeout.
var waitMethods = map[string]bool{
	"/kiln.agent.v1.Containers/WaitProcess": true,
}

// timeoutInterceptor bounds every unary agent request that has no earlier deadline by d: the one place that
// turns agent.request_timeout into deadlines, so that a hung agent fails each call instead of the caller.
func timeoutInterceptor(d time.Duration) ttrpc.UnaryClientInterceptor {
	return func(ctx context.Context, req *ttrpc.Request, resp *ttrpc.Response, info *ttrpc.UnaryClientInfo, invoke ttrpc.Invoker) error {
		if d > 0 && !waitMethods[info.FullMethod] {
			if dl, ok := ctx.Deadline(); !ok || time.Until(dl) > d {
				var cancel context.CancelFunc
				ctx, cancel = context.WithTimeout(ctx, d)
				defer cancel()
				// ttrpc tells the agent the caller's deadline before the interceptors run: the agent is told this one,
				// so that what it carries out past it is taken back there too (agent/container's unwaited).
				req.TimeoutNano = d.Nanoseconds()
			}
		}
		return invoke(ctx, req, resp)
	}
}

// newClient is a ttrpc client on conn whose requests are bounded by the request timeout, and so are its writes
// (boundedWrites), and whose answers' errors are made safe (guestErrors).
func newClient(conn net.Conn, requestTimeout time.Duration, opts ...ttrpc.ClientOpts) *ttrpc.Client {
	if requestTimeout > 0 {
		conn = boundedWrites{Conn: conn, d: requestTimeout}
	}
	return ttrpc.NewClient(conn, append(opts, ttrpc.WithChainUnaryClientInterceptor(guestErrors, timeoutInterceptor(requestTimeout)))...)
}

// boundedWrites is an agent connection each of whose writes must end within d. ttrpc's client holds its send lock
// across a write that no context bounds: a guest that stops reading (it gives the vsock device no credit, the
// host socket's buffer fills) would hold every later call, the pod's stop and SIGKILL included. A write past d
// closes the connection, since it may have written part of a frame: every call then fails as with a lost agent.
type boundedWrites struct {
	net.Conn
	d time.Duration
}

func (c boundedWrites) Write(p []byte) (int, error) {
	if err := c.Conn.SetWriteDeadline(time.Now().Add(c.d)); err != nil {
		return 0, fmt.Errorf("bound the write to the agent: %w", err)
	}
	n, err := c.Conn.Write(p)
	if errors.Is(err, os.ErrDeadlineExceeded) {
		_ = c.Conn.Close()
		return n, fmt.Errorf("the guest took no request for %s; its agent connection is closed: %w", c.d, err)
	}
	return n, err
}

// bounded runs call and returns its error, or ctx's once ctx ends first: ttrpc's client holds a call in its write
// to a guest that takes nothing, whatever the call's context, until boundedWrites' deadline (the request timeout).
// A call left behind ends by that deadline.
func bounded(ctx context.Context, call func() error) error {
	done := make(chan error, 1)
	go func() { done <- call() }()
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}
