package container

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/containerd/ttrpc"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"google.golang.org/protobuf/types/known/timestamppb"

	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
	"github.com/kiln-runtime/kiln/runtime/stdio"
	"github.com/kiln-runtime/kiln/vm"
)

func TestOOMEventsAreForwarded(t *testing.T) {
	a := newFakeAgent(t, map[string]script{"c1/": func(p *fakeProc) uint32 { return 137 }})
	var mu sync.Mutex
	var seen []Event
	m := a.start(Options{OnEvent: func(e Event) {
		mu.Lock()
		seen = append(seen, e)
		mu.Unlock()
	}})
	ctx := waitCtx(t)
	c, err := m.Create(ctx, CreateOptions{ID: "c1"})
	if err != nil {
		t.Fatal(err)
	}
	a.sendOOM("c1")
	if err := c.Start(ctx); err != nil {
		t.Fatal(err)
	}
	e, err := c.Wait(ctx)
	if err != nil || e.Status != 137 {
		t.Fatalf("wait %+v %v", e, err)
	}
	// The event loop hands the exit to OnEvent after it ended the process, so Wait may return first.
	for {
		mu.Lock()
		n := len(seen)
		mu.Unlock()
		if n >= 2 || ctx.Err() != nil {
			break
		}
		time.Sleep(time.Millisecond)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(seen) != 2 || seen[0].Kind != EventOOM || seen[1].Kind != EventExit || seen[1].ExitStatus != 137 {
		t.Errorf("events %+v", seen)
	}
}

// Exits still arrive when the events stream broke once, or when the agent has none at all.
func TestExitWithoutAHealthyEventsStream(t *testing.T) {
	for _, tc := range []struct {
		name string
		set  func(*fakeAgent)
	}{
		{"broken once", func(a *fakeAgent) { a.breakEventsOnce = true }},
		{"unimplemented", func(a *fakeAgent) { a.noEvents = true }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := newFakeAgent(t, map[string]script{"c1/": outErr7})
			tc.set(a)
			m := a.start(Options{})
			ctx := waitCtx(t)
			var out bytes.Buffer
			c := started(t, ctx, m, CreateOptions{ID: "c1", IO: stdio.IO{Stdout: &out, Stderr: io.Discard}})
			e, err := c.Wait(ctx)
			if err != nil || e.Status != 7 || out.String() != "out\n" {
				t.Errorf("wait %+v %v, stdout %q", e, err, out.String())
			}
		})
	}
}

// A guest that breaks its events stream again and again (each break makes the host ask every pending process's
// exit directly) gets one WaitProcess call per process at a time, not one more per break.
func TestBrokenEventsStreamsDoNotPileUpWaits(t *testing.T) {
	stop := make(chan struct{})
	a := newFakeAgent(t, map[string]script{"c1/": func(p *fakeProc) uint32 { <-stop; return 0 }})
	a.breakEvents = true
	m := a.start(Options{})
	ctx := waitCtx(t)
	c := started(t, ctx, m, CreateOptions{ID: "c1", IO: stdio.IO{Stdout: io.Discard, Stderr: io.Discard}})
	for {
		a.mu.Lock()
		subs := a.subs
		a.mu.Unlock()
		if subs >= 8 {
			break
		}
		if ctx.Err() != nil {
			t.Fatalf("only %d subscriptions", subs)
		}
		time.Sleep(10 * time.Millisecond)
	}
	a.mu.Lock()
	waits := 0
	for _, call := range a.calls {
		if call == "wait c1/" {
			waits++
		}
	}
	a.mu.Unlock()
	if waits != 1 {
		t.Errorf("%d WaitProcess calls for one pending process after 8 broken streams, want 1", waits)
	}
	close(stop)
	if e, err := c.Wait(ctx); err != nil || e.Status != 0 {
		t.Errorf("wait %+v %v", e, err)
	}
}

// closer counts its Close calls.
type closer struct {
	mu sync.Mutex
	n  int
}

func (c *closer) Close() error {
	c.mu.Lock()
	c.n++
	c.mu.Unlock()
	return nil
}

func (c *closer) count() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.n
}

// The regression this pins: a process that exits at once must not be reported exited before its start is
// reported, and no lock may be held across the agent request to get that order.
func TestExitIsNeverReportedBeforeStart(t *testing.T) {
	stop := make(chan struct{})
	a := newFakeAgent(t, map[string]script{"c1/": func(p *fakeProc) uint32 { <-stop; return 0 }, "c1/e1": func(p *fakeProc) uint32 { return 3 }})
	var mu sync.Mutex
	var order []string
	note := func(s string) {
		mu.Lock()
		order = append(order, s)
		mu.Unlock()
	}
	m := a.start(Options{OnExit: func(p *Process, e Exit) { note(fmt.Sprintf("exit %s %d", p.ID(), e.Status)) }})
	ctx := waitCtx(t)
	io := &closer{}
	c, err := m.Create(ctx, CreateOptions{ID: "c1", Release: io})
	if err != nil {
		t.Fatal(err)
	}
	hold := make(chan struct{})
	if err := c.Init().Start(ctx, func() { note("start init") }); err != nil {
		t.Fatal(err)
	}
	p, err := c.AddExec("e1", &specs.Process{Args: []string{"x"}}, stdio.IO{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		time.Sleep(50 * time.Millisecond)
		close(hold)
	}()
	if err := p.Start(ctx, func() { <-hold; note("start e1") }); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	close(stop)
	if _, err := c.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	got := strings.Join(order, ",")
	mu.Unlock()
	if got != "start init,start e1,exit e1 3,exit  0" {
		t.Errorf("order %q: an exit was reported before its start", got)
	}
	if io.count() != 1 {
		t.Errorf("init IO released %d times, want once", io.count())
	}
}

// An earlier exec's exit that the guest reports late, after that exec was deleted and its id used again, while
// the new exec's start waits for the guest's answer (which says the new process's pid), is not the new exec's:
// the host knew no pid to tell them apart by, and ended the new exec with the old exit.
func TestLateExitOfAnEarlierExecWhileTheNextStarts(t *testing.T) {
	var runs atomic.Int32
	a := newFakeAgent(t, map[string]script{
		"c1/": func(p *fakeProc) uint32 { select {} },
		"c1/e1": func(p *fakeProc) uint32 {
			if runs.Add(1) == 1 {
				return 5
			}
			return 3
		},
	})
	oom := make(chan struct{}, 1)
	m := a.start(Options{OnEvent: func(e Event) {
		if e.Kind == EventOOM {
			oom <- struct{}{}
		}
	}})
	ctx := waitCtx(t)
	c := started(t, ctx, m, CreateOptions{ID: "c1"})
	p, err := c.Exec(ctx, "e1", &specs.Process{Args: []string{"x"}}, stdio.IO{})
	if err != nil {
		t.Fatal(err)
	}
	if e, err := p.Wait(ctx); err != nil || e.Status != 5 {
		t.Fatalf("first e1: %+v, %v", e, err)
	}
	if _, err := c.DeleteProcess(ctx, "e1"); err != nil {
		t.Fatal(err)
	}
	a.mu.Lock()
	a.onExec = func(r *agentv1.ExecProcessRequest) {
		// The first e1's exit again, under the pid it had (not the 43 the fake answers with), then an OOM event,
		// which tells the test the events loop has dispatched the exit before the answer goes out.
		a.events <- &agentv1.Event{Event: &agentv1.Event_Exit{Exit: &agentv1.ExitEvent{
			ContainerId: "c1", ExecId: "e1", Pid: 7, ExitStatus: 5, ExitedAt: timestamppb.Now()}}}
		a.sendOOM("c1")
		<-oom
	}
	a.mu.Unlock()
	p, err = c.Exec(ctx, "e1", &specs.Process{Args: []string{"x"}}, stdio.IO{})
	if err != nil {
		t.Fatal(err)
	}
	if e, err := p.Wait(ctx); err != nil || e.Status != 3 || e.Pid != 43 {
		t.Errorf("second e1: %+v, %v; want its own exit (status 3, pid 43), not the first one's late report", e, err)
	}
}

// Finding 2 of the hardening review: a guest must not be able to publish an OOM for a container of another pod.
func TestEventsForUnknownContainersAreDropped(t *testing.T) {
	a := newFakeAgent(t, map[string]script{"c1/": func(p *fakeProc) uint32 { return 0 }})
	var mu sync.Mutex
	var seen []Event
	m := a.start(Options{OnEvent: func(e Event) {
		mu.Lock()
		seen = append(seen, e)
		mu.Unlock()
	}})
	ctx := waitCtx(t)
	a.sendOOM("someone-else")
	c := started(t, ctx, m, CreateOptions{ID: "c1"})
	if _, err := c.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	for _, e := range seen {
		if e.ContainerID != "c1" {
			t.Errorf("event about a container the host does not hold was forwarded: %+v", e)
		}
	}
}

// closingEvents is an events client whose stream ends as a closed agent connection's does once closed is closed.
type closingEvents struct {
	agentv1.ContainersClient
	closed chan struct{}
}

func (c closingEvents) Events(ctx context.Context, _ *agentv1.EventsRequest) (agentv1.Containers_EventsClient, error) {
	return closingStream{ctx: ctx, closed: c.closed}, nil
}

type closingStream struct {
	ttrpc.ClientStream
	ctx    context.Context
	closed chan struct{}
}

func (s closingStream) Recv() (*agentv1.Event, error) {
	select {
	case <-s.closed:
		return nil, ttrpc.ErrClosed
	case <-s.ctx.Done():
		return nil, s.ctx.Err()
	}
}

// When the events stream's connection closes, the caller's report of why the guest went (its VM's end, here the
// host's OOM killer) is waited for a moment and wins: the container's OOM kill is reported, nothing abandoned.
// Without a report the guest is given up once the moment has passed.
func TestEventsConnectionClosedWaitsForWhy(t *testing.T) {
	for _, tc := range []struct {
		name      string
		why       error // reported by the caller after the connection closed; nil: nothing
		wantOOM   bool
		abandoned bool
	}{
		{name: "VM OOM-killed", why: fmt.Errorf("VM p ended: %w", vm.ErrOOMKilled), wantOOM: true},
		{name: "VM killed", why: errors.New("VM p ended: signal: killed")},
		{name: "nothing said", abandoned: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := newFakeAgent(t, map[string]script{"c1/": func(p *fakeProc) uint32 { select {} }})
			closed := make(chan struct{})
			var mu sync.Mutex
			var oom bool
			var abandoned error
			m := a.start(Options{
				Events:    closingEvents{closed: closed},
				lostGrace: 500 * time.Millisecond,
				OnEvent: func(e Event) {
					mu.Lock()
					oom = oom || e.Kind == EventOOM && e.ContainerID == "c1"
					mu.Unlock()
				},
				Abandon: func(reason error) {
					mu.Lock()
					abandoned = reason
					mu.Unlock()
				},
			})
			ctx := waitCtx(t)
			c := started(t, ctx, m, CreateOptions{ID: "c1"})
			close(closed)
			if tc.why != nil {
				time.Sleep(50 * time.Millisecond)
				m.Lost(tc.why)
			}
			if e, err := c.Wait(ctx); err != nil || e.Status != 137 {
				t.Errorf("wait: %+v, %v; want status 137", e, err)
			}
			time.Sleep(time.Second) // past the grace: an abandonment would have come
			mu.Lock()
			defer mu.Unlock()
			if oom != tc.wantOOM {
				t.Errorf("OOM kill of c1 reported: %v, want %v", oom, tc.wantOOM)
			}
			if (abandoned != nil) != tc.abandoned {
				t.Errorf("abandoned: %v, want %v", abandoned, tc.abandoned)
			}
		})
	}
}
