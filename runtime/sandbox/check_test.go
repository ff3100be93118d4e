package sandbox

import (
	"context"
	"errors"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/containerd/ttrpc"
	"google.golang.org/protobuf/proto"

	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
	"github.com/kiln-runtime/kiln/vm"
)

// exitedMachine is a VM whose exit is a test's to decide; only what Check uses works.
type exitedMachine struct {
	vm.Machine
	exited chan struct{}
}

func (m exitedMachine) ID() string              { return "m" }
func (m exitedMachine) Exited() <-chan struct{} { return m.exited }
func (m exitedMachine) ExitError() error        { return errors.New("killed") }

// Check passes only for a running VM whose agent answers SERVING within the timeout.
func TestCheck(t *testing.T) {
	notServing := func(w io.Writer, stream uint32) error {
		payload, _ := proto.Marshal(&agentv1.CheckResponse{Status: agentv1.CheckResponse_NOT_SERVING})
		b, _ := proto.Marshal(&ttrpc.Response{Payload: payload})
		if err := frame(w, uint32(len(b)), stream, 2); err != nil {
			return err
		}
		_, err := w.Write(b)
		return err
	}
	// Reads the request, answers nothing.
	silent := func(io.Writer, uint32) error { return errors.New("no answer") }
	tests := []struct {
		name   string
		exited bool
		reply  func(io.Writer, uint32) error // nil: SERVING
		want   string                        // "" for no error
	}{
		{name: "serving"},
		{name: "VM ended", exited: true, want: "vm m ended: killed"},
		{name: "not serving", reply: notServing, want: "NOT_SERVING"},
		{name: "no answer", reply: silent, want: "health check"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			host, guest := net.Pipe()
			var script []func(io.Writer, uint32) error
			if tt.reply != nil {
				script = append(script, tt.reply)
			}
			go rawAgent{guest}.serve(script)
			client := newClient(host, time.Minute)
			defer client.Close()
			m := exitedMachine{exited: make(chan struct{})}
			if tt.exited {
				close(m.exited)
			}
			s := &Sandbox{m: m, health: agentv1.NewHealthClient(client)}
			err := s.Check(context.Background(), 200*time.Millisecond)
			if tt.want == "" {
				if err != nil {
					t.Fatalf("Check = %v, want nil", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("Check = %v, want an error containing %q", err, tt.want)
			}
		})
	}
}
