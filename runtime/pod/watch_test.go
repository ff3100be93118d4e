package pod

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sirupsen/logrus"

	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
	"github.com/kiln-runtime/kiln/runtime/container"
	"github.com/kiln-runtime/kiln/vm"
)

// watchedMachine is a running VM that exits when exit is closed. Only what watchVM uses works.
type watchedMachine struct {
	vm.Machine
	exit chan struct{}

	mu      sync.Mutex
	stopped int
}

func (m *watchedMachine) Exited() <-chan struct{} { return m.exit }
func (m *watchedMachine) ExitError() error        { return errors.New("QEMU exited: signal: killed") }
func (m *watchedMachine) Stop(context.Context) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.stopped++
	return nil
}

// quietAgent is an agent whose events stream never sends anything, and that fails every create.
type quietAgent struct{ agentv1.ContainersClient }

func (quietAgent) CreateContainer(context.Context, *agentv1.CreateContainerRequest) (*agentv1.CreateContainerResponse, error) {
	return nil, errors.New("the agent was asked")
}

func (quietAgent) Events(ctx context.Context, _ *agentv1.EventsRequest) (agentv1.Containers_EventsClient, error) {
	<-ctx.Done()
	return nil, ctx.Err()
}

// A pod whose agent connection ends while its VM runs on gives the guest up (every process reported killed)
// and stops the VM: no request, not even a SIGKILL, reaches that guest again. A connection that ends because
// the VM did is the VM's end, said as such; and nothing is done for a pod that is closing.
func TestWatchVMGivesUpAGuestThatHungUp(t *testing.T) {
	tests := []struct {
		name      string
		vmExits   bool // the VM exits just after the connection ends
		closing   bool
		wantLost  string // in the error a create gets afterwards; "" for none
		wantStops int
	}{
		{name: "the VM runs on", wantLost: "agent connection of VM pod1 closed while the VM ran", wantStops: 1},
		{name: "the VM ended", vmExits: true, wantLost: "VM pod1 ended: QEMU exited: signal: killed"},
		{name: "the pod is closing", closing: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := &watchedMachine{exit: make(chan struct{})}
			ctrs := container.NewManager(quietAgent{}, nil, container.Options{Log: logrus.NewEntry(logrus.New())})
			t.Cleanup(func() { _ = ctrs.Close() })
			p := &Pod{id: "pod1", log: logrus.NewEntry(logrus.New()), closing: make(chan struct{}), ctrs: ctrs}
			if tt.closing {
				close(p.closing)
			}
			hungUp := make(chan struct{})
			close(hungUp)
			if tt.vmExits {
				go func() { time.Sleep(10 * time.Millisecond); close(m.exit) }()
			}
			done := make(chan struct{})
			go func() { p.watchVM(m, hungUp); close(done) }()
			select {
			case <-done:
			case <-time.After(10 * time.Second):
				t.Fatal("watchVM still runs 10 s after the agent connection ended")
			}
			_, err := ctrs.Create(context.Background(), container.CreateOptions{ID: "c1"})
			switch {
			case tt.wantLost == "" && errors.Is(err, container.ErrClosed):
				t.Errorf("the guest was given up: %v", err)
			case tt.wantLost != "" && (err == nil || !strings.Contains(err.Error(), tt.wantLost)):
				t.Errorf("create after: %v, want the guest given up, saying %q", err, tt.wantLost)
			}
			m.mu.Lock()
			defer m.mu.Unlock()
			if m.stopped != tt.wantStops {
				t.Errorf("the VM was stopped %d times, want %d", m.stopped, tt.wantStops)
			}
		})
	}
}
