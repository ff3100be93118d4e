package sandbox

import (
	"context"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/containerd/ttrpc"
	"google.golang.org/grpc/codes"
	grpcstatus "google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
)

// An agent's error is the guest's word: a status message of megabytes, with line breaks and terminal escapes,
// reaches the host's log and containerd's errors cut to maxGuestError and escaped, with its code kept.
func TestAgentErrorsAreMadeSafe(t *testing.T) {
	long := strings.Repeat("forged\ntime=0 level=error msg=\x1b[31mowned\x1b[0m ", 1<<15)
	host, guest := net.Pipe()
	go rawAgent{guest}.serve([]func(io.Writer, uint32) error{func(w io.Writer, stream uint32) error {
		b, err := proto.Marshal(&ttrpc.Response{Status: grpcstatus.New(codes.NotFound, long).Proto()})
		if err != nil {
			return err
		}
		if err := frame(w, uint32(len(b)), stream, 2); err != nil {
			return err
		}
		_, err = w.Write(b)
		return err
	}})
	client := newClient(host, 2*time.Second)
	defer client.Close()
	_, err := agentv1.NewHealthClient(client).Check(context.Background(), &agentv1.CheckRequest{})
	if grpcstatus.Code(err) != codes.NotFound {
		t.Fatalf("the agent's NotFound came back as %v, want its code kept", err)
	}
	msg := grpcstatus.Convert(err).Message()
	if len(msg) > maxGuestError+64 || strings.ContainsAny(msg, "\n\x1b") || !strings.HasPrefix(msg, `forged\ntime=0`) {
		t.Errorf("the agent's message came back as %d bytes starting %.80q, want at most about %d, escaped", len(msg), msg, maxGuestError)
	}
}

// The events stream's end passes through the same bound: the host logs it at every retry.
func TestEventsStreamErrorsAreMadeSafe(t *testing.T) {
	long := strings.Repeat("x\n", 1<<20)
	c := guestStreams{endingEvents{err: grpcstatus.Error(codes.Internal, long)}}
	s, err := c.Events(context.Background(), &agentv1.EventsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	_, err = s.Recv()
	if msg := grpcstatus.Convert(err).Message(); grpcstatus.Code(err) != codes.Internal || len(msg) > maxGuestError+64 || strings.Contains(msg, "\n") {
		t.Errorf("the stream's end came back as %v with %d bytes, want Internal, cut and escaped", grpcstatus.Code(err), len(msg))
	}
	// The host's own errors are left as they are.
	for _, own := range []error{io.EOF, ttrpc.ErrClosed, context.DeadlineExceeded} {
		if got := guestError(own); got != own {
			t.Errorf("guestError(%v) = %v, want it unchanged", own, got)
		}
	}
}

// endingEvents is an agent whose events stream ends at once with err.
type endingEvents struct {
	agentv1.ContainersClient
	err error
}

type endedStream struct {
	agentv1.Containers_EventsClient
	err error
}

func (s endedStream) Recv() (*agentv1.Event, error) { return nil, s.err }

func (c endingEvents) Events(context.Context, *agentv1.EventsRequest) (agentv1.Containers_EventsClient, error) {
	return endedStream{err: c.err}, nil
}
