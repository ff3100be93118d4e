package sandbox

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"os"
	"runtime"
	"testing"
	"time"

	"github.com/containerd/ttrpc"
	"google.golang.org/protobuf/proto"

	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
)

// rawAgent answers ttrpc requests on one connection with frames a test writes byte by byte: an agent that
// misbehaves on purpose. Each request gets the next reply of the script; replies past the script are proper
// health answers.
type rawAgent struct {
	conn net.Conn
}

// frame writes one ttrpc frame header: length, stream id, type (2: response), flags.
func frame(w io.Writer, length, stream uint32, typ byte) error {
	var h [10]byte
	binary.BigEndian.PutUint32(h[:4], length)
	binary.BigEndian.PutUint32(h[4:8], stream)
	h[8] = typ
	_, err := w.Write(h[:])
	return err
}

func serving() []byte {
	payload, _ := proto.Marshal(&agentv1.CheckResponse{Status: agentv1.CheckResponse_SERVING})
	b, _ := proto.Marshal(&ttrpc.Response{Payload: payload})
	return b
}

// answerServing answers a request on stream with a proper health answer.
func answerServing(w io.Writer, stream uint32) error {
	b := serving()
	if err := frame(w, uint32(len(b)), stream, 2); err != nil {
		return err
	}
	_, err := w.Write(b)
	return err
}

func (a rawAgent) serve(script []func(w io.Writer, stream uint32) error) {
	var h [10]byte
	for i := 0; ; i++ {
		if _, err := io.ReadFull(a.conn, h[:]); err != nil {
			return
		}
		if _, err := io.CopyN(io.Discard, a.conn, int64(binary.BigEndian.Uint32(h[:4]))); err != nil {
			return
		}
		stream := binary.BigEndian.Uint32(h[4:8])
		reply := answerServing
		if i < len(script) {
			reply = script[i]
		}
		if err := reply(a.conn, stream); err != nil {
			return
		}
	}
}

// The guest is untrusted: an agent's reply that is oversized, malformed or for a stream nobody asked on fails
// (or times out) the one call it answers, costs no memory beyond a frame's bound, and leaves the connection
// usable for the next call.
func TestMisbehavingAgentRepliesFailOnlyTheirCall(t *testing.T) {
	tests := []struct {
		name  string
		reply func(w io.Writer, stream uint32) error
	}{
		{"oversized reply (64 MiB)", func(w io.Writer, stream uint32) error {
			const n = 64 << 20
			if err := frame(w, n, stream, 2); err != nil {
				return err
			}
			_, err := io.CopyN(w, zeros{}, n)
			return err
		}},
		{"malformed reply", func(w io.Writer, stream uint32) error {
			junk := []byte{0xff, 0xff, 0xff, 0xff, 0x0f, 0x01, 0x02}
			if err := frame(w, uint32(len(junk)), stream, 2); err != nil {
				return err
			}
			_, err := w.Write(junk)
			return err
		}},
		{"reply on a stream nobody opened", func(w io.Writer, stream uint32) error {
			b := serving()
			if err := frame(w, uint32(len(b)), stream+1000, 2); err != nil {
				return err
			}
			_, err := w.Write(b)
			return err
		}},
		{"data frame instead of a response", func(w io.Writer, stream uint32) error {
			b := serving()
			if err := frame(w, uint32(len(b)), stream, 3); err != nil {
				return err
			}
			_, err := w.Write(b)
			return err
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			host, guest := net.Pipe()
			go rawAgent{guest}.serve([]func(io.Writer, uint32) error{tt.reply})
			client := newClient(host, 2*time.Second)
			defer client.Close()
			health := agentv1.NewHealthClient(client)
			var before runtime.MemStats
			runtime.GC()
			runtime.ReadMemStats(&before)
			if resp, err := health.Check(context.Background(), &agentv1.CheckRequest{}); err == nil {
				t.Fatalf("the misbehaving reply was taken as an answer: %v", resp)
			} else if errors.Is(err, ttrpc.ErrClosed) {
				t.Fatalf("the misbehaving reply closed the connection: %v", err)
			}
			var after runtime.MemStats
			runtime.ReadMemStats(&after)
			if grew := int64(after.TotalAlloc) - int64(before.TotalAlloc); grew > 16<<20 {
				t.Errorf("the client allocated %d bytes for one reply", grew)
			}
			resp, err := health.Check(context.Background(), &agentv1.CheckRequest{})
			if err != nil || resp.GetStatus() != agentv1.CheckResponse_SERVING {
				t.Errorf("the next call on the connection: %v, %v; want SERVING", resp, err)
			}
		})
	}
}

// zeros reads as an endless run of zero bytes.
type zeros struct{}

func (zeros) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}

// A guest that stops reading its agent connection fails the call whose write it holds up, after the request
// timeout, and every later call at once: ttrpc's sender holds its lock across the write, so without the bound one
// stuck write would hold the pod's stop for good.
func TestAgentThatStopsReadingFailsCalls(t *testing.T) {
	host, guest := net.Pipe() // synchronous: a write waits for the guest to read it, which it never does
	defer guest.Close()
	client := newClient(host, 200*time.Millisecond)
	defer client.Close()
	health := agentv1.NewHealthClient(client)
	for i, what := range []string{"the call whose write is stuck", "the next call"} {
		done := make(chan error, 1)
		go func() {
			_, err := health.Check(context.Background(), &agentv1.CheckRequest{})
			done <- err
		}()
		select {
		case err := <-done:
			if err == nil {
				t.Fatalf("%s succeeded with a guest that reads nothing", what)
			}
			if i == 0 && !errors.Is(err, os.ErrDeadlineExceeded) && !errors.Is(err, ttrpc.ErrClosed) {
				t.Errorf("%s: %v, want the write's timeout", what, err)
			}
		case <-time.After(10 * time.Second):
			_ = host.Close() // let the stuck goroutine go
			t.Fatalf("%s still waits after 10 s with a 200 ms request timeout", what)
		}
	}
}
