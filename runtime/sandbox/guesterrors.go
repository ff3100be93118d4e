package sandbox

import (
	"context"

	"github.com/containerd/ttrpc"
	"google.golang.org/grpc/status"

	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
	"github.com/kiln-runtime/kiln/vm"
)

// maxGuestError bounds the message of an error the agent answers with, as the host logs it and passes it on.
const maxGuestError = 1024

// guestError is err with the agent's words made safe (vm.GuestText) when they are the agent's (a status it
// answered with): a ttrpc status may carry megabytes, line breaks and terminal escapes, which went into the shim's
// log (an events stream the agent keeps ending is logged at every retry) and into containerd's errors. The status
// code, details and errors of the host's own (a deadline, a closed connection) are kept as they are.
func guestError(err error) error {
	st, ok := status.FromError(err)
	if err == nil || !ok {
		return err
	}
	p := st.Proto()
	if safe := vm.GuestText(p.GetMessage(), maxGuestError); safe != p.GetMessage() {
		p.Message = safe
		return status.ErrorProto(p)
	}
	return err
}

// guestErrors is the client interceptor that makes every agent answer's status safe as guestError does (ttrpc
// turns the answer's status into the call's error after the interceptors).
func guestErrors(ctx context.Context, req *ttrpc.Request, resp *ttrpc.Response, info *ttrpc.UnaryClientInfo, invoke ttrpc.Invoker) error {
	err := invoke(ctx, req, resp)
	if st := resp.GetStatus(); st != nil {
		st.Message = vm.GuestText(st.GetMessage(), maxGuestError)
	}
	return guestError(err)
}

// guestStreams is a container client whose Events stream's errors pass through guestError, as the unary calls'
// do (guestErrors): ttrpc has no interceptor for streams.
type guestStreams struct{ agentv1.ContainersClient }

func (c guestStreams) Events(ctx context.Context, r *agentv1.EventsRequest) (agentv1.Containers_EventsClient, error) {
	s, err := c.ContainersClient.Events(ctx, r)
	if err != nil {
		return nil, guestError(err)
	}
	return guestEvents{s}, nil
}

type guestEvents struct {
	agentv1.Containers_EventsClient
}

func (s guestEvents) Recv() (*agentv1.Event, error) {
	ev, err := s.Containers_EventsClient.Recv()
	return ev, guestError(err)
}
