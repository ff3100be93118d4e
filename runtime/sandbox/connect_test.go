package sandbox

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/sirupsen/logrus"

	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
	"github.com/kiln-runtime/kiln/vm"
)

// bootingMachine is a VM whose agent starts listening after the host's first dial: it then announces itself on
// the host's agentv1.ReadyPort when announces is set. Only what connect uses works.
type bootingMachine struct {
	vm.Machine
	dir       string
	announces bool

	mu        sync.Mutex
	listening bool
	dials     int
	readyPath string // the listener's socket, once ListenVsock ran
}

func (m *bootingMachine) Exited() <-chan struct{} { return nil }

func (m *bootingMachine) ListenVsock(port uint32) (net.Listener, error) {
	if port != agentv1.ReadyPort {
		return nil, fmt.Errorf("listen on port %d, want the ready port", port)
	}
	m.readyPath = filepath.Join(m.dir, fmt.Sprintf("vsock.sock_%d", port))
	return net.Listen("unix", m.readyPath)
}

func (m *bootingMachine) DialVsock(_ context.Context, port uint32) (net.Conn, error) {
	if port != AgentPort {
		return nil, fmt.Errorf("dial port %d, want the agent's", port)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.dials++
	if !m.listening {
		m.listening = true
		if m.announces {
			go func() {
				if c, err := net.Dial("unix", m.readyPath); err == nil {
					c.Close()
				}
			}()
		}
		return nil, errors.New("connection reset: nothing listens yet")
	}
	host, guest := net.Pipe()
	go rawAgent{guest}.serve(nil)
	return host, nil
}

// plainMachine is a bootingMachine whose guest cannot connect to the host (the kernel's vhost-vsock): it has no
// ListenVsock.
type plainMachine struct {
	vm.Machine
	b *bootingMachine
}

func (m plainMachine) DialVsock(ctx context.Context, port uint32) (net.Conn, error) {
	return m.b.DialVsock(ctx, port)
}
func (m plainMachine) Exited() <-chan struct{} { return nil }

// A booting guest's announcement ends the host's wait for its agent: with a retry interval of an hour, only the
// announcement can get the second dial made. A guest that does not announce is still reached by the retries, and
// a machine the guest cannot connect to by polling. Nothing is left listening afterwards.
func TestConnectWaitsForTheAgentsAnnouncement(t *testing.T) {
	tests := []struct {
		name      string
		plain     bool
		announces bool
		retry     time.Duration
	}{
		{name: "announced", announces: true, retry: time.Hour},
		{name: "silent agent, retried", retry: time.Millisecond},
		{name: "no ready listener, polled", plain: true, retry: time.Hour},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			bm := &bootingMachine{dir: t.TempDir(), announces: tt.announces}
			var m vm.Machine = bm
			if tt.plain {
				m = plainMachine{b: bm}
			}
			s := &Sandbox{m: m, hungUp: make(chan struct{}), opts: Options{
				DialTimeout: time.Minute, RequestTimeout: time.Minute, RedialInterval: tt.retry,
				Log: logrus.NewEntry(logrus.New()),
			}}
			if err := s.connect(context.Background()); err != nil {
				t.Fatalf("connect = %v", err)
			}
			defer s.client.Close()
			if bm.dials != 2 {
				t.Errorf("dialled the agent %d times, want 2 (refused, then answered)", bm.dials)
			}
			if s.Announced() != tt.announces {
				t.Errorf("Announced() = %v, want %v", s.Announced(), tt.announces)
			}
			if tt.plain {
				if bm.readyPath != "" {
					t.Errorf("listened at %s on a machine without ListenVsock", bm.readyPath)
				}
				return
			}
			if _, err := os.Stat(bm.readyPath); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("the ready listener's socket is left after connect: %v", err)
			}
		})
	}
}

// restoredMachine is a VM restored from its template whose guest is dead until BootInstead boots it (when restored
// is set); a VM that was booted stays dead. Only what Start uses works.
type restoredMachine struct {
	vm.Machine
	restored bool
	dead     chan struct{}

	mu              sync.Mutex
	booted, stopped int
}

func (m *restoredMachine) ID() string                  { return "vm" }
func (m *restoredMachine) Start(context.Context) error { return nil }
func (m *restoredMachine) ExitError() error            { return errors.New("the guest died") }

func (m *restoredMachine) Stop(context.Context) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.stopped++
	return nil
}

func (m *restoredMachine) Restored() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.restored && m.booted == 0
}

func (m *restoredMachine) BootInstead(context.Context, error) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.booted++
	return nil
}

func (m *restoredMachine) Exited() <-chan struct{} {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.booted == 0 {
		return m.dead
	}
	return nil
}

func (m *restoredMachine) DialVsock(context.Context, uint32) (net.Conn, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.booted == 0 {
		return nil, errors.New("connection reset")
	}
	host, guest := net.Pipe()
	go rawAgent{guest}.serve(nil)
	return host, nil
}

// A VM restored from its template whose guest does not come up is booted instead, once, and the sandbox starts;
// a booted VM whose guest does not come up, or a start the caller gave up on, fails and is stopped.
func TestStartBootsInsteadOfADeadRestore(t *testing.T) {
	tests := []struct {
		name            string
		restored        bool
		cancelled       bool
		wantErr         bool
		booted, stopped int
	}{
		{name: "restored guest died", restored: true, booted: 1},
		{name: "booted guest died", wantErr: true, stopped: 1},
		{name: "caller gave up", restored: true, cancelled: true, wantErr: true, stopped: 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := &restoredMachine{restored: tt.restored, dead: make(chan struct{})}
			close(m.dead)
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			if tt.cancelled {
				cancel()
			}
			s, err := Start(ctx, m, Options{DialTimeout: time.Minute, RequestTimeout: time.Minute, Log: logrus.NewEntry(logrus.New())})
			if (err != nil) != tt.wantErr {
				t.Fatalf("Start = %v, want an error: %v", err, tt.wantErr)
			}
			if s != nil {
				defer s.client.Close()
			}
			if m.booted != tt.booted || m.stopped != tt.stopped {
				t.Errorf("booted instead %d times and stopped %d, want %d and %d", m.booted, m.stopped, tt.booted, tt.stopped)
			}
		})
	}
}
