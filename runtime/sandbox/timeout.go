package sandbox

import (
	"context"
	"net"
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
			}
		}
		return invoke(ctx, req, resp)
	}
}

// newClient is a ttrpc client on conn whose requests are bounded by the request timeout.
func newClient(conn net.Conn, requestTimeout time.Duration) *ttrpc.Client {
	return ttrpc.NewClient(conn, ttrpc.WithUnaryClientInterceptor(timeoutInterceptor(requestTimeout)))
}
