package container

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
	"github.com/kiln-runtime/kiln/proto/lifecycle"
	"github.com/kiln-runtime/kiln/runtime/stdio"
)

// slowWriter is a stdout whose reader takes its time (a fifo a client drains slowly).
type slowWriter struct {
	mu sync.Mutex
	n  int
}

func (w *slowWriter) Write(b []byte) (int, error) {
	time.Sleep(20 * time.Millisecond)
	w.mu.Lock()
	defer w.mu.Unlock()
	w.n += len(b)
	return len(b), nil
}

// A Delete right after the init's exit (a client that saw the task stopped) waits for the output the process
// wrote and for its exit's report: nothing is cut off, and the exit is reported before Delete returns, so a
// TaskExit precedes the TaskDelete.
func TestDeleteAfterExitDeliversFirst(t *testing.T) {
	const size = 100 << 10
	a := newFakeAgent(t, map[string]script{"c1/": func(p *fakeProc) uint32 {
		_, _ = p.conns["stdout"].Write(make([]byte, size))
		return 3
	}})
	var reported atomic.Bool
	m := a.start(Options{OnExit: func(*Process, Exit) { reported.Store(true) }})
	ctx := waitCtx(t)
	w := &slowWriter{}
	c := started(t, ctx, m, CreateOptions{ID: "c1", IO: stdio.IO{Stdout: w}})
	for c.State() != lifecycle.Stopped {
		time.Sleep(time.Millisecond)
	}
	e, err := c.Delete(ctx, false)
	if err != nil || e.Status != 3 {
		t.Fatalf("Delete = %+v, %v; want status 3", e, err)
	}
	if !reported.Load() {
		t.Error("the exit was reported after Delete returned")
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.n != size {
		t.Errorf("%d of %d bytes of output delivered by Delete", w.n, size)
	}
}

// execGate holds the next ExecProcess until released, then fails it with fail, or lets it through.
type execGate struct {
	entered, release chan struct{}
	fail             error
}

// pass holds the request until the gate is released.
func (g *execGate) pass() error {
	close(g.entered)
	<-g.release
	return g.fail
}

// startGated adds exec e1 to c and starts it in the background through an execGate failing with fail; it returns
// once the start's request is held, with the gate and where the start's result comes.
func startGated(t *testing.T, ctx context.Context, a *fakeAgent, c *Container, fail error) (*Process, *execGate, <-chan error) {
	t.Helper()
	g := &execGate{entered: make(chan struct{}), release: make(chan struct{}), fail: fail}
	a.mu.Lock()
	a.gate = g
	a.mu.Unlock()
	p, err := c.AddExec("e1", &specs.Process{Args: []string{"x"}}, stdio.IO{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	started := make(chan error, 1)
	go func() { started <- p.Start(ctx, nil) }()
	<-g.entered
	return p, g, started
}

// An exec whose guest is lost while its start is out ends: its Wait returns and its delete succeeds, rather than
// both waiting for a delivery that never began.
func TestExecLostWhileStartingEnds(t *testing.T) {
	a := newFakeAgent(t, map[string]script{"c1/": func(*fakeProc) uint32 { select {} }})
	m := a.start(Options{})
	ctx := waitCtx(t)
	c := started(t, ctx, m, CreateOptions{ID: "c1"})
	p, g, starting := startGated(t, ctx, a, c, errors.New("ttrpc: closed"))
	m.Lost(errors.New("the VM is gone"))
	close(g.release)
	if err := <-starting; err == nil {
		t.Fatal("the exec started on a lost guest")
	}
	wctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if _, err := p.Wait(wctx); wctx.Err() != nil {
		t.Fatalf("Wait of the exec: %v", err)
	}
	if _, err := c.DeleteProcess(wctx, "e1"); err != nil {
		t.Fatalf("DeleteProcess of the exec: %v", err)
	}
}

// A Delete of an exec whose start is out (a client that gave up on the Start) is refused, as runc's shim refuses
// it once the start is done: deleted, the exec would run on in the guest with no one on the host to wait for it
// or kill it. Once started, it is a running process to kill and delete as any other; one never started is
// deleted at once, and no Start begins after that.
func TestDeleteOfAStartingExecIsRefused(t *testing.T) {
	a := newFakeAgent(t, map[string]script{"c1/": func(*fakeProc) uint32 { select {} }, "c1/e1": func(*fakeProc) uint32 { select {} }})
	m := a.start(Options{})
	ctx := waitCtx(t)
	c := started(t, ctx, m, CreateOptions{ID: "c1"})
	p, g, starting := startGated(t, ctx, a, c, nil)
	if _, err := c.DeleteProcess(ctx, "e1"); !errors.Is(err, ErrInvalidState) {
		t.Errorf("DeleteProcess of an exec starting: %v, want ErrInvalidState", err)
	}
	close(g.release)
	if err := <-starting; err != nil {
		t.Fatalf("the exec's start: %v", err)
	}
	if got, err := c.Process("e1"); err != nil || got != p {
		t.Fatalf("the exec after the refused Delete: %v, %v", got, err)
	}
	p2, err := c.AddExec("e2", &specs.Process{Args: []string{"x"}}, stdio.IO{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if e, err := c.DeleteProcess(ctx, "e2"); err != nil || e.Status != 137 {
		t.Errorf("DeleteProcess of an exec never started = %+v, %v; want status 137", e, err)
	}
	if err := p2.Start(ctx, nil); err == nil {
		t.Error("a deleted exec started")
	}
}

// Two Deletes of one container at once (CRI's exit handler and its waiter) delete it once: the other finds it
// deleted (NotFound), so the task's deletion is reported once.
func TestConcurrentDeletesDeleteOnce(t *testing.T) {
	a := newFakeAgent(t, map[string]script{"c1/": func(*fakeProc) uint32 { return 0 }})
	m := a.start(Options{})
	ctx := waitCtx(t)
	c := started(t, ctx, m, CreateOptions{ID: "c1"})
	if _, err := c.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	errs := make(chan error, 2)
	for range 2 {
		go func() {
			_, err := c.Delete(ctx, false)
			errs <- err
		}()
	}
	var ok, notFound int
	for range 2 {
		switch err := <-errs; {
		case err == nil:
			ok++
		case errors.Is(err, ErrNotFound):
			notFound++
		default:
			t.Errorf("Delete: %v", err)
		}
	}
	if ok != 1 || notFound != 1 {
		t.Errorf("%d Deletes succeeded and %d found the container deleted, want one each", ok, notFound)
	}
}

// exitLog records the exits a manager reports (Options.OnExit), in order.
type exitLog struct {
	mu    sync.Mutex
	order []string
}

func (l *exitLog) record(p *Process, e Exit) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.order = append(l.order, fmt.Sprintf("%q %d", p.ID(), e.Status))
}

// String is the exits reported so far, as `"<exec id>" <status>` joined by commas.
func (l *exitLog) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Join(l.order, ", ")
}

// The init's exit is the container's last, as runc's shim reports them: execs that outlive it (a container that
// shares a PID namespace) are killed and their exits reported first, and no exec starts after it.
func TestInitExitIsTheLast(t *testing.T) {
	initExits, killed := make(chan struct{}), make(chan struct{})
	a := newFakeAgent(t, map[string]script{
		"c1/":   func(*fakeProc) uint32 { <-initExits; return 0 },
		"c1/e1": func(*fakeProc) uint32 { <-killed; return 137 },
	})
	var once sync.Once
	a.onSignal = func(r *agentv1.SignalProcessRequest) {
		if r.GetAll() && r.GetSignal() == 9 {
			once.Do(func() { close(killed) })
		}
	}
	exits := &exitLog{}
	m := a.start(Options{OnExit: exits.record})
	ctx := waitCtx(t)
	c := started(t, ctx, m, CreateOptions{ID: "c1"})
	if _, err := c.Exec(ctx, "e1", &specs.Process{Args: []string{"sleep"}}, stdio.IO{}); err != nil {
		t.Fatal(err)
	}
	close(initExits)
	if _, err := c.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	if got, want := exits.String(), `"e1" 137, "" 0`; got != want {
		t.Errorf("exits reported %s, want %s", got, want)
	}
	if _, err := c.Exec(ctx, "e2", &specs.Process{Args: []string{"true"}}, stdio.IO{}); !errors.Is(err, ErrInvalidState) {
		t.Errorf("an exec after the init exited: %v, want ErrInvalidState", err)
	}
}

// An exec whose start is out as the init exits is waited for: its exit, too, is reported before the init's.
func TestInitExitWaitsForAnExecStarting(t *testing.T) {
	initExits := make(chan struct{})
	a := newFakeAgent(t, map[string]script{
		"c1/":   func(*fakeProc) uint32 { <-initExits; return 0 },
		"c1/e1": func(*fakeProc) uint32 { time.Sleep(100 * time.Millisecond); return 7 },
	})
	exits := &exitLog{}
	m := a.start(Options{OnExit: exits.record})
	ctx := waitCtx(t)
	c := started(t, ctx, m, CreateOptions{ID: "c1"})
	_, g, starting := startGated(t, ctx, a, c, nil)
	close(initExits)
	time.Sleep(200 * time.Millisecond)
	if exits.String() != "" {
		t.Error("the init's exit was reported while an exec's start was out")
	}
	close(g.release)
	if err := <-starting; err != nil {
		t.Fatal(err)
	}
	if _, err := c.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	if got, want := exits.String(), `"e1" 7, "" 0`; got != want {
		t.Errorf("exits reported %s, want %s", got, want)
	}
}

// The agent's NotFound is the guest's word, not the task API's: for a signal (or an update) it is a process that
// finished before the host heard of its exit (ErrNotFound, as runc's), for a removal one an earlier removal
// carried out after its caller stopped waiting. That Delete still removes the host's side: a Delete answered
// NotFound would have containerd forget a task whose VM the shim still holds.
func TestAgentNotFound(t *testing.T) {
	forever := func(*fakeProc) uint32 { select {} }
	a := newFakeAgent(t, map[string]script{"c1/": forever, "c1/e1": forever, "c2/": forever})
	m := a.start(Options{})
	ctx := waitCtx(t)
	c := started(t, ctx, m, CreateOptions{ID: "c1"})
	p, err := c.Exec(ctx, "e1", &specs.Process{Args: []string{"x"}}, stdio.IO{})
	if err != nil {
		t.Fatal(err)
	}
	a.mu.Lock()
	a.answer = status.Error(codes.NotFound, "process already finished")
	a.mu.Unlock()
	for name, call := range map[string]func() error{
		"signal to the container": func() error { return c.Kill(ctx, 15, false) },
		"signal to the exec":      func() error { return p.Signal(ctx, 15) },
		// CRI takes the update of a container that is gone for done.
		"update": func() error { return c.Update(ctx, &specs.LinuxResources{}) },
	} {
		err := call()
		if !errors.Is(err, ErrNotFound) || !strings.Contains(err.Error(), "process already finished") {
			t.Errorf("%s, answered NotFound: %v, want ErrNotFound with the agent's words", name, err)
		}
		if _, ok := status.FromError(err); ok {
			t.Errorf("%s: %v carries the agent's status", name, err)
		}
	}
	a.mu.Lock()
	a.answer = status.Error(codes.NotFound, `container "c1" not found`)
	a.mu.Unlock()
	e, err := c.Delete(ctx, true)
	if err != nil || e.Status != 137 {
		t.Fatalf("forced Delete answered NotFound by the agent = %+v, %v; want status 137", e, err)
	}
	if n := m.Len(); n != 0 {
		t.Errorf("%d containers registered after the Delete, want 0", n)
	}
	a.mu.Lock()
	a.answer = status.Error(codes.Internal, "remove failed")
	a.mu.Unlock()
	c2 := started(t, ctx, m, CreateOptions{ID: "c2"})
	if _, err := c2.Delete(ctx, true); err == nil || status.Code(err) != codes.Internal {
		t.Errorf("Delete answered Internal by the agent: %v, want that error", err)
	}
}
