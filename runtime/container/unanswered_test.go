package container

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
	"github.com/kiln-runtime/kiln/runtime/stdio"
)

// abandonLog records the reasons the manager gave the guest up for.
type abandonLog struct {
	mu      sync.Mutex
	reasons []error
}

func (l *abandonLog) add(reason error) {
	l.mu.Lock()
	l.reasons = append(l.reasons, reason)
	l.mu.Unlock()
}

func (l *abandonLog) get() []error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]error(nil), l.reasons...)
}

// waitAbandoned waits until the guest was given up, and fails the test when it is not within d.
func (l *abandonLog) waitAbandoned(t *testing.T, d time.Duration) []error {
	t.Helper()
	for end := time.Now().Add(d); time.Now().Before(end); time.Sleep(10 * time.Millisecond) {
		if r := l.get(); len(r) > 0 {
			return r
		}
	}
	t.Fatalf("the guest was not given up within %s", d)
	return nil
}

// A SIGKILL or a removal the agent does not answer gives the guest up when the request runs into the request
// timeout, even when its caller stopped waiting first: containerd's CRI deletes under a 10 s deadline, shorter
// than the request timeout, so that every retry failed on it and the pod could never be removed. Once the guest is
// given up, the caller's retry succeeds without the agent.
func TestUnansweredRequestOutlivesItsCaller(t *testing.T) {
	for _, tt := range []struct {
		name string
		act  func(ctx context.Context, c *Container, exec *Process) error
		// retry is whether the caller retries once the guest was given up (a stopped exec is not signalled
		// again: the task service answers that it finished).
		retry bool
	}{
		{"SIGKILL to the container", func(ctx context.Context, c *Container, _ *Process) error { return c.Kill(ctx, 9, true) }, true},
		{"SIGKILL to an exec", func(ctx context.Context, _ *Container, p *Process) error { return p.Signal(ctx, 9) }, false},
		{"forced delete", func(ctx context.Context, c *Container, _ *Process) error { _, err := c.Delete(ctx, true); return err }, true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			a := newFakeAgent(t, map[string]script{"c1/": func(p *fakeProc) uint32 { select {} }, "c1/e1": func(p *fakeProc) uint32 { select {} }})
			var abandoned abandonLog
			m := a.start(Options{Abandon: abandoned.add})
			ctx := waitCtx(t)
			c := started(t, ctx, m, CreateOptions{ID: "c1"})
			p, err := c.Exec(ctx, "e1", &specs.Process{Args: []string{"x"}}, stdio.IO{})
			if err != nil {
				t.Fatal(err)
			}
			a.mu.Lock()
			a.hang = 300 * time.Millisecond
			a.mu.Unlock()
			short, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
			err = tt.act(short, c, p)
			cancel()
			if !errors.Is(err, context.DeadlineExceeded) {
				t.Fatalf("with a caller that stops waiting before the request timeout: %v, want its deadline", err)
			}
			reasons := abandoned.waitAbandoned(t, 5*time.Second)
			if len(reasons) != 1 || !strings.Contains(reasons[0].Error(), "did not answer") {
				t.Errorf("Abandon called with %v, want once, saying the agent did not answer", reasons)
			}
			if tt.retry {
				if err := tt.act(ctx, c, p); err != nil {
					t.Errorf("the caller's retry once the guest was given up: %v, want success", err)
				}
			}
			for _, proc := range []*Process{c.Init(), p} {
				if e, err := proc.Wait(ctx); e.Status != 137 || (err != nil && !errors.Is(err, ErrDeleted)) {
					t.Errorf("wait for %q: %+v, %v, want status 137", proc.ID(), e, err)
				}
			}
		})
	}
}

// A process the agent delivered SIGKILL to must exit: when no exit comes within the kill grace, the host asks
// the agent for it directly (the guest lost its exit event), and gives the guest up when that brings none either
// (the process outlives SIGKILL, as one blocked in the guest's kernel on the pod's hung virtiofsd does). Before,
// the container, and kubelet's stop of its pod, waited for good.
func TestSIGKILLWithoutAnExit(t *testing.T) {
	t.Run("the exit event is lost", func(t *testing.T) {
		killed := make(chan struct{})
		var once sync.Once
		a := newFakeAgent(t, map[string]script{"c1/": func(p *fakeProc) uint32 { <-killed; return 137 }})
		a.onSignal = func(r *agentv1.SignalProcessRequest) {
			if r.GetSignal() == 9 {
				once.Do(func() { close(killed) })
			}
		}
		a.dropExits = true
		var abandoned abandonLog
		m := a.start(Options{Abandon: abandoned.add, KillGrace: 100 * time.Millisecond})
		ctx := waitCtx(t)
		c := started(t, ctx, m, CreateOptions{ID: "c1"})
		if err := c.Kill(ctx, 9, false); err != nil {
			t.Fatal(err)
		}
		if e, err := c.Wait(ctx); err != nil || e.Status != 137 {
			t.Errorf("wait after SIGKILL whose exit event was lost: %+v, %v, want status 137", e, err)
		}
		if r := abandoned.get(); len(r) != 0 {
			t.Errorf("the guest was given up (%v), though it answered the direct wait", r)
		}
	})
	t.Run("the process outlives SIGKILL under an agent that answers", func(t *testing.T) {
		a := newFakeAgent(t, map[string]script{"c1/": func(p *fakeProc) uint32 { select {} }})
		var abandoned abandonLog
		m := a.start(Options{Abandon: abandoned.add, KillGrace: 50 * time.Millisecond})
		ctx := waitCtx(t)
		c := started(t, ctx, m, CreateOptions{ID: "c1"})
		if err := c.Kill(ctx, 9, false); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Second)
		if r := abandoned.get(); len(r) != 0 {
			t.Errorf("the guest was given up (%v), though its agent answers: the process is its container's trouble", r)
		}
		if _, exited := c.Init().ExitStatus(); exited {
			t.Error("the process was reported exited")
		}
	})
	t.Run("the process outlives SIGKILL under an agent that stops answering", func(t *testing.T) {
		a := newFakeAgent(t, map[string]script{"c1/": func(p *fakeProc) uint32 { select {} }, "c1/e1": func(p *fakeProc) uint32 { select {} }})
		var abandoned abandonLog
		m := a.start(Options{Abandon: abandoned.add, KillGrace: 100 * time.Millisecond})
		ctx := waitCtx(t)
		c := started(t, ctx, m, CreateOptions{ID: "c1"})
		p, err := c.Exec(ctx, "e1", &specs.Process{Args: []string{"x"}}, stdio.IO{})
		if err != nil {
			t.Fatal(err)
		}
		if err := p.Signal(ctx, 9); err != nil {
			t.Fatal(err)
		}
		if err := p.Signal(ctx, 9); err != nil {
			t.Fatal(err)
		}
		a.mu.Lock()
		a.hang = 300 * time.Millisecond
		a.mu.Unlock()
		reasons := abandoned.waitAbandoned(t, 5*time.Second)
		if !strings.Contains(reasons[0].Error(), "after SIGKILL") {
			t.Errorf("Abandon called with %v, want a reason naming the SIGKILL", reasons)
		}
		for _, proc := range []*Process{c.Init(), p} {
			if e, err := proc.Wait(ctx); err != nil || e.Status != 137 {
				t.Errorf("wait for %q: %+v, %v, want status 137", proc.ID(), e, err)
			}
		}
		time.Sleep(300 * time.Millisecond)
		if r := abandoned.get(); len(r) != 1 {
			t.Errorf("Abandon called %d times (%v), want once for two SIGKILLs", len(r), r)
		}
	})
}

// A create or an exec whose answer the host stopped waiting for is taken back in the guest, which carried it out
// all the same: the host forgets it, and the guest held a container (its init, cgroup and state) until the pod
// ended, or an exec's process ran on with no one to wait for it or kill it.
func TestGivenUpRequestsAreTakenBack(t *testing.T) {
	a := newFakeAgent(t, map[string]script{"c1/": func(p *fakeProc) uint32 { select {} }, "c1/e1": func(p *fakeProc) uint32 { select {} }})
	var mu sync.Mutex
	var kills []string
	a.onSignal = func(r *agentv1.SignalProcessRequest) {
		mu.Lock()
		kills = append(kills, fmt.Sprintf("%s/%s %d", r.GetContainerId(), r.GetExecId(), r.GetSignal()))
		mu.Unlock()
	}
	m := a.start(Options{})
	ctx := waitCtx(t)
	c := started(t, ctx, m, CreateOptions{ID: "c1"})
	p, err := c.AddExec("e1", &specs.Process{Args: []string{"x"}}, stdio.IO{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	a.mu.Lock()
	a.loseAnswers = true
	a.mu.Unlock()
	if err := p.Start(ctx, nil); !errors.Is(err, context.DeadlineExceeded) && status.Code(err) != codes.DeadlineExceeded {
		t.Fatalf("exec whose answer was lost: %v, want a deadline", err)
	}
	mu.Lock()
	got := strings.Join(kills, ",")
	mu.Unlock()
	if got != "c1/e1 9" {
		t.Errorf("signals after the exec's answer was lost: %q, want SIGKILL to c1/e1", got)
	}
	if _, err := m.Create(ctx, CreateOptions{ID: "c2"}); err == nil {
		t.Fatal("create whose answer was lost succeeded")
	}
	if calls := strings.Join(a.recorded(), ","); !strings.Contains(calls, "create c2,remove c2") {
		t.Errorf("agent calls %s: want c2's removal after its create", calls)
	}
	a.mu.Lock()
	a.loseAnswers = false
	a.mu.Unlock()
	if _, err := m.Create(ctx, CreateOptions{ID: "c2"}); err != nil {
		t.Errorf("create of c2 again: %v", err)
	}
}
