package pod

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/cgroups/v3"
	"github.com/containerd/cgroups/v3/cgroup1"
	"github.com/sirupsen/logrus"

	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
	"github.com/kiln-runtime/kiln/runtime/container"
	"github.com/kiln-runtime/kiln/runtime/hostcgroup"
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

// A VM whose processes the host's OOM killer took in the pod's host cgroup (a spare's, moved there when a pod
// adopted it, out of the VM's own cgroup that qemu.Machine counts) ended for want of memory, and says so.
func TestWatchVMCountsTheHostCgroupsOOMKills(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to create cgroups")
	}
	hog := exec.Command("/bin/sh", "-c", `read go; x=$(head -c 64000000 /dev/zero | tr '\0' a)`)
	in, err := hog.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := hog.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = hog.Process.Kill(); _ = hog.Wait() }()
	path := fmt.Sprintf("/kiln-pod-oom-test-%d", os.Getpid())
	g, err := hostcgroup.Enter(path, hog.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// Leave cannot take back a process the kernel killed; the cgroup goes all the same.
		if g.Leave() != nil {
			if cgroups.Mode() == cgroups.Unified {
				_ = os.Remove("/sys/fs/cgroup" + path)
			} else if cg, err := cgroup1.Load(cgroup1.StaticPath(path)); err == nil {
				_ = cg.Delete()
			}
		}
	})
	limit := "/sys/fs/cgroup" + path + "/memory.max"
	if cgroups.Mode() != cgroups.Unified {
		limit = "/sys/fs/cgroup/memory" + path + "/memory.limit_in_bytes"
	}
	if err := os.WriteFile(limit, []byte(fmt.Sprint(16<<20)), 0); err != nil {
		t.Fatal(err)
	}
	lostWith := func() string {
		m := &watchedMachine{exit: make(chan struct{})}
		close(m.exit)
		ctrs := container.NewManager(quietAgent{}, nil, container.Options{Log: logrus.NewEntry(logrus.New())})
		t.Cleanup(func() { _ = ctrs.Close() })
		p := &Pod{id: "pod1", log: logrus.NewEntry(logrus.New()), closing: make(chan struct{}), ctrs: ctrs, cgroup: g}
		p.watchVM(m, nil)
		_, err := ctrs.Create(context.Background(), container.CreateOptions{ID: "c1"})
		return fmt.Sprint(err)
	}
	if got := lostWith(); strings.Contains(got, "OOM") {
		t.Errorf("a VM ended before any OOM kill: %s", got)
	}
	if _, err := in.Write([]byte("go\n")); err != nil {
		t.Fatal(err)
	}
	_ = hog.Wait()
	if got := lostWith(); !strings.Contains(got, "the host's OOM killer ended the VM") {
		t.Errorf("a VM ended after an OOM kill in the pod's host cgroup: %s", got)
	}
}
