package task

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
	"google.golang.org/grpc/codes"
	grpcstatus "google.golang.org/grpc/status"

	"github.com/kiln-runtime/kiln/runtime/container"
)

// toGRPC gives the task API's codes from Kiln's kinds; an answer of the agent in the chain keeps its words, and its
// code only where containerd takes the code for nothing about the task.
func TestToGRPC(t *testing.T) {
	agent := func(c codes.Code) error { return grpcstatus.Error(c, "the guest's words") }
	for _, tc := range []struct {
		name string
		err  error
		want codes.Code
	}{
		{"Kiln's kind", fmt.Errorf("task c: %w", container.ErrNotFound), codes.NotFound},
		{"an errdefs kind", fmt.Errorf("hooks: %w", errdefs.ErrNotImplemented), codes.Unimplemented},
		{"no kind", errors.New("plain"), codes.Unknown},
		{"a context's end", fmt.Errorf("create: %w", context.Canceled), codes.Canceled},
		{"the agent's NotFound", fmt.Errorf("delete container c: %w", agent(codes.NotFound)), codes.Unknown},
		{"the agent's Unimplemented", fmt.Errorf("create: %w", agent(codes.Unimplemented)), codes.Unknown},
		{"the agent's AlreadyExists", fmt.Errorf("create: %w", agent(codes.AlreadyExists)), codes.Unknown},
		{"the agent's Unavailable", fmt.Errorf("exec: %w", agent(codes.Unavailable)), codes.Unknown},
		{"the agent's InvalidArgument", fmt.Errorf("create: %w", agent(codes.InvalidArgument)), codes.InvalidArgument},
		{"the agent's FailedPrecondition", fmt.Errorf("pause: %w", agent(codes.FailedPrecondition)), codes.FailedPrecondition},
		{"Kiln's kind over the agent's code", fmt.Errorf("signal: %w: %w", container.ErrNotFound, agent(codes.Internal)), codes.NotFound},
		{"Kiln's state over the agent's NotFound", fmt.Errorf("start: %w: %w", container.ErrInvalidState, agent(codes.NotFound)), codes.FailedPrecondition},
		{"an errdefs kind over the agent's", fmt.Errorf("grow: %w: %w", errdefs.ErrInvalidArgument, agent(codes.Unimplemented)), codes.InvalidArgument},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := toGRPC(tc.err)
			st, ok := grpcstatus.FromError(got)
			if !ok {
				t.Fatalf("toGRPC(%v) = %v, no status", tc.err, got)
			}
			if st.Code() != tc.want {
				t.Errorf("toGRPC(%v) code %v, want %v", tc.err, st.Code(), tc.want)
			}
			if !strings.Contains(st.Message(), tc.err.Error()) {
				t.Errorf("toGRPC(%v) message %q, want the error's words", tc.err, st.Message())
			}
		})
	}
}
