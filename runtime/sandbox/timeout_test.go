package sandbox

import (
	"context"
	"testing"
	"time"

	"github.com/containerd/ttrpc"
)

func TestTimeoutInterceptor(t *testing.T) {
	const bound = time.Minute
	tests := []struct {
		name     string
		method   string
		deadline time.Duration // 0: none
		want     time.Duration // 0: no deadline expected
	}{
		{"request without deadline gets the bound", "/kiln.agent.v1.Containers/StartContainer", 0, bound},
		{"an earlier deadline stays", "/kiln.agent.v1.Containers/StartContainer", time.Second, time.Second},
		{"a later deadline is cut to the bound", "/kiln.agent.v1.Agent/GuestInfo", time.Hour, bound},
		{"waiting for an exit is never bounded", "/kiln.agent.v1.Containers/WaitProcess", 0, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx := context.Background()
			if tt.deadline > 0 {
				var cancel context.CancelFunc
				ctx, cancel = context.WithTimeout(ctx, tt.deadline)
				defer cancel()
			}
			var got time.Duration
			var has bool
			invoke := func(ctx context.Context, _ *ttrpc.Request, _ *ttrpc.Response) error {
				var dl time.Time
				dl, has = ctx.Deadline()
				got = time.Until(dl)
				return nil
			}
			req := &ttrpc.Request{}
			err := timeoutInterceptor(bound)(ctx, req, &ttrpc.Response{}, &ttrpc.UnaryClientInfo{FullMethod: tt.method}, invoke)
			if err != nil {
				t.Fatal(err)
			}
			// The agent is told the bound the interceptor set (ttrpc tells it the caller's own before).
			if applied := tt.want == bound; applied != (req.TimeoutNano == bound.Nanoseconds()) {
				t.Errorf("the request tells the agent a timeout of %d ns, want %d when the bound applies", req.TimeoutNano, bound.Nanoseconds())
			}
			if tt.want == 0 {
				if has {
					t.Fatalf("deadline set (%s away), want none", got)
				}
				return
			}
			if !has || got > tt.want || got < tt.want-5*time.Second {
				t.Fatalf("deadline %s away (set %t), want about %s", got, has, tt.want)
			}
		})
	}
}
