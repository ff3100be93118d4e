package sandbox

import (
	"context"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/kiln-runtime/kiln/vm"
)

// pipeMachine is a running VM whose agent answers on a pipe the test holds the guest's end of (script as
// rawAgent's). Only what Start and Stop use works.
type pipeMachine struct {
	vm.Machine
	script []func(w io.Writer, stream uint32) error

	mu    sync.Mutex
	guest net.Conn
}

func (m *pipeMachine) ID() string                  { return "vm" }
func (m *pipeMachine) Start(context.Context) error { return nil }
func (m *pipeMachine) Stop(context.Context) error  { return nil }
func (m *pipeMachine) Wait(context.Context) error  { return nil }
func (m *pipeMachine) Exited() <-chan struct{}     { return nil }
func (m *pipeMachine) ExitError() error            { return nil }
func (m *pipeMachine) DialVsock(context.Context, uint32) (net.Conn, error) {
	host, guest := net.Pipe()
	m.mu.Lock()
	m.guest = guest
	m.mu.Unlock()
	go rawAgent{guest}.serve(m.script)
	return host, nil
}

// HungUp tells the sandbox's owner that no request can reach the agent any more: when the guest closes the
// agent connection, and when it stops reading requests (a write past the request timeout closes it). Not when
// Stop closes it.
func TestHungUpWhenTheAgentConnectionEnds(t *testing.T) {
	stuck := make(chan struct{})
	t.Cleanup(func() { close(stuck) })
	stopReading := func(io.Writer, uint32) error { <-stuck; return io.EOF }
	tests := []struct {
		name   string
		script []func(w io.Writer, stream uint32) error
		end    func(t *testing.T, s *Sandbox, m *pipeMachine)
		hungUp bool
	}{
		{
			name: "the guest closes it",
			end: func(t *testing.T, s *Sandbox, m *pipeMachine) {
				m.mu.Lock()
				defer m.mu.Unlock()
				m.guest.Close()
			},
			hungUp: true,
		},
		{
			// The health check and the seed are answered; the third request is read, never answered, and
			// nothing more is read.
			name:   "the guest stops reading",
			script: []func(w io.Writer, stream uint32) error{answerServing, answerServing, stopReading},
			end: func(t *testing.T, s *Sandbox, m *pipeMachine) {
				for range 2 {
					ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
					_, _ = s.GuestInfo(ctx)
					cancel()
				}
			},
			hungUp: true,
		},
		{
			name: "Stop closes it",
			end: func(t *testing.T, s *Sandbox, m *pipeMachine) {
				if err := s.Stop(context.Background()); err != nil {
					t.Fatal(err)
				}
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := &pipeMachine{script: tt.script}
			s, err := Start(context.Background(), m, Options{RequestTimeout: 200 * time.Millisecond, ShutdownTimeout: time.Millisecond, Log: logrus.NewEntry(logrus.New())})
			if err != nil {
				t.Fatal(err)
			}
			defer s.client.Close()
			select {
			case <-s.HungUp():
				t.Fatal("hung up before the connection ended")
			default:
			}
			tt.end(t, s, m)
			select {
			case <-s.HungUp():
				if !tt.hungUp {
					t.Error("hung up, though Stop closed the connection")
				}
			case <-time.After(2 * time.Second):
				if tt.hungUp {
					t.Error("no hang-up 2 s after the agent connection ended")
				}
			}
		})
	}
}

// A hung agent (it reads Shutdown and never answers) holds Stop for the shutdown timeout, not for a whole request
// timeout.
func TestStopDoesNotWaitOutAHungAgent(t *testing.T) {
	silent := func(io.Writer, uint32) error { return nil }
	m := &pipeMachine{script: []func(w io.Writer, stream uint32) error{answerServing, answerServing, silent}}
	s, err := Start(context.Background(), m, Options{RequestTimeout: time.Minute, ShutdownTimeout: 100 * time.Millisecond, Log: logrus.NewEntry(logrus.New())})
	if err != nil {
		t.Fatal(err)
	}
	stopped := make(chan error, 1)
	go func() { stopped <- s.Stop(context.Background()) }()
	select {
	case err := <-stopped:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Stop still waits for a hung agent's answer to Shutdown 5 s on, with a 100 ms shutdown timeout")
	}
}

// An agent that did not answer Shutdown powers nothing off: Stop goes on to stop the VM, and does not wait a
// second shutdown timeout for a power-off (it went past containerd's 3 s for a Shutdown).
func TestStopWaitsNoPowerOffFromAnUnansweredShutdown(t *testing.T) {
	silent := func(io.Writer, uint32) error { return nil }
	m := &pipeMachine{script: []func(w io.Writer, stream uint32) error{answerServing, answerServing, silent}}
	const shutdown = 2 * time.Second
	s, err := Start(context.Background(), m, Options{RequestTimeout: time.Minute, ShutdownTimeout: shutdown, Log: logrus.NewEntry(logrus.New())})
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := s.Stop(context.Background()); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d >= 2*shutdown-200*time.Millisecond {
		t.Errorf("Stop took %s with a %s shutdown timeout: it waited for a power-off after the agent did not answer", d, shutdown)
	}
}
