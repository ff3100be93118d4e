package container

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/cgroups"
	"github.com/opencontainers/runc/libcontainer"
	"github.com/opencontainers/runc/libcontainer/configs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
)

// settingContainer sets resources as libcontainer does: Config hands out a copy of the live configuration whose
// cgroup is the live one's pointer, and a Set the cgroup refuses applies the live resources again and keeps them.
type settingContainer struct {
	inertContainer
	mu      sync.Mutex
	live    *configs.Config
	applied []cgroups.Resources
}

func (c *settingContainer) Config() configs.Config {
	c.mu.Lock()
	defer c.mu.Unlock()
	return *c.live
}

func (c *settingContainer) Set(cfg configs.Config) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if cfg.Cgroups.Resources.CpusetCpus == "9" {
		c.applied = append(c.applied, *c.live.Cgroups.Resources)
		return errors.New("write cpuset.cpus: invalid argument")
	}
	c.applied = append(c.applied, *cfg.Cgroups.Resources)
	c.live = &cfg
	return nil
}

// A refused update leaves the container's resources as they were, and the next update applies what it names
// on top of them: libcontainer restores the live resources when a set fails, and the merge once wrote into them,
// so the refused value came back with every later update, each refused in turn.
func TestRefusedUpdateLeavesTheResources(t *testing.T) {
	lc := &settingContainer{live: &configs.Config{Cgroups: &cgroups.Cgroup{Resources: &cgroups.Resources{Memory: 32 << 20, CpusetCpus: "0-1"}}}}
	s := &Service{containers: map[string]*container{"c": {id: "c", lc: lc}}}
	update := func(r specs.LinuxResources) error {
		raw, err := json.Marshal(r)
		if err != nil {
			t.Fatal(err)
		}
		_, err = s.UpdateContainer(context.Background(), &agentv1.UpdateContainerRequest{ContainerId: "c", Resources: raw})
		return err
	}
	if err := update(specs.LinuxResources{CPU: &specs.LinuxCPU{Cpus: "9"}}); err == nil {
		t.Fatal("an update the cgroup refuses succeeded")
	}
	if got := lc.applied[0]; got.CpusetCpus != "0-1" {
		t.Errorf("restored after the refused update: cpuset %q, want 0-1", got.CpusetCpus)
	}
	limit := int64(64 << 20)
	if err := update(specs.LinuxResources{Memory: &specs.LinuxMemory{Limit: &limit}}); err != nil {
		t.Fatalf("an update after a refused one: %v", err)
	}
	if got := lc.applied[1]; got.CpusetCpus != "0-1" || got.Memory != limit {
		t.Errorf("applied cpuset %q, memory %d; want 0-1 and %d", got.CpusetCpus, got.Memory, limit)
	}
}

// A process still running when a removal's wait for it ends is refused with a code the host does not take for its
// own request's deadline, which would make it give up the pod's whole guest; the host's deadline still ends the
// wait as a deadline.
func TestWaitAllOutlived(t *testing.T) {
	c := &container{id: "c", init: &process{done: make(chan struct{})}}
	err := c.waitAll(context.Background(), time.Millisecond)
	if code := status.Code(err); code != codes.FailedPrecondition {
		t.Errorf("waitAll past its bound = %v (%v), want FailedPrecondition", err, code)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Millisecond)
	defer cancel()
	if code := status.Code(c.waitAll(ctx, time.Minute)); code != codes.DeadlineExceeded {
		t.Errorf("waitAll past the request's deadline = %v, want DeadlineExceeded", code)
	}
}

// exitedContainer is a container whose init has exited and been reaped, while its state is not Stopped yet.
type exitedContainer struct{ inertContainer }

func (*exitedContainer) Signal(os.Signal) error { return libcontainer.ErrNotRunning }

// A signal that races the init's exit (reaped, its output still draining) is NotFound, as runc answers, not an
// unknown failure that fails CRI's StopContainer.
func TestSignalRacingExitIsNotFound(t *testing.T) {
	s := fuzzService(t)
	s.containers["running"].lc = &exitedContainer{}
	_, err := s.SignalProcess(context.Background(), &agentv1.SignalProcessRequest{ContainerId: "running", Signal: 15})
	if status.Code(err) != codes.NotFound {
		t.Fatalf("SignalProcess of an exited init = %v (%v), want NotFound", err, status.Code(err))
	}
}
