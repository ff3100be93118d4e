package container

import (
	"bytes"
	"crypto/rand"
	"errors"
	"io"
	"strings"
	"sync"
	"testing"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/kiln-runtime/kiln/runtime/stdio"
)

// outErr7 writes to stdout and stderr and exits 7.
func outErr7(p *fakeProc) uint32 {
	_, _ = p.conns["stdout"].Write([]byte("out\n"))
	_, _ = p.conns["stderr"].Write([]byte("err\n"))
	return 7
}

func TestRunInitDeliversOutputAndStatus(t *testing.T) {
	a := newFakeAgent(t, map[string]script{"c1/": outErr7})
	m := a.start(Options{})
	ctx := waitCtx(t)
	var out, errOut bytes.Buffer
	c, err := m.Create(ctx, CreateOptions{ID: "c1", Spec: []byte(`{}`), Rootfs: "c1/rootfs", IO: stdio.IO{Stdout: &out, Stderr: &errOut}})
	if err != nil {
		t.Fatal(err)
	}
	if c.State() != Created || c.Init().Pid() != 42 {
		t.Errorf("after create: state %s pid %d", c.State(), c.Init().Pid())
	}
	if err := c.Start(ctx); err != nil {
		t.Fatal(err)
	}
	e, err := c.Wait(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if e.Status != 7 || out.String() != "out\n" || errOut.String() != "err\n" {
		t.Errorf("status %d stdout %q stderr %q", e.Status, out.String(), errOut.String())
	}
	if c.State() != Stopped {
		t.Errorf("state after exit %s, want stopped", c.State())
	}
	if err := c.Delete(ctx, false); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Get("c1"); !errors.Is(err, ErrNotFound) {
		t.Errorf("Get after delete: %v", err)
	}
}

// The regression this pins: the exit event can reach the host before the last output bytes have been read
// from the stream; Wait must still hand over every byte.
func TestWaitDrainsOutputSentBeforeExit(t *testing.T) {
	big := make([]byte, 8<<20)
	_, _ = rand.Read(big)
	a := newFakeAgent(t, map[string]script{"c1/": func(p *fakeProc) uint32 {
		_, _ = p.conns["stdout"].Write(big)
		return 0
	}})
	m := a.start(Options{})
	ctx := waitCtx(t)
	var out bytes.Buffer
	c, err := m.Create(ctx, CreateOptions{ID: "c1", IO: stdio.IO{Stdout: &out}})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(out.Bytes(), big) {
		t.Errorf("got %d bytes of output, want %d", out.Len(), len(big))
	}
}

func TestExecStdinRoundTripAndInstantExit(t *testing.T) {
	a := newFakeAgent(t, map[string]script{
		"c1/": func(p *fakeProc) uint32 { select {} },
		"c1/cat": func(p *fakeProc) uint32 {
			_, _ = io.Copy(p.conns["stdout"], p.conns["stdin"])
			return 0
		},
		"c1/instant": func(p *fakeProc) uint32 { return 3 },
	})
	m := a.start(Options{})
	ctx := waitCtx(t)
	c, err := m.Create(ctx, CreateOptions{ID: "c1"})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Start(ctx); err != nil {
		t.Fatal(err)
	}
	in := make([]byte, 2<<20)
	_, _ = rand.Read(in)
	var out bytes.Buffer
	p, err := c.Exec(ctx, "cat", &specs.Process{Args: []string{"cat"}}, stdio.IO{Stdin: bytes.NewReader(in), Stdout: &out})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(out.Bytes(), in) {
		t.Errorf("cat returned %d bytes, want %d", out.Len(), len(in))
	}
	if _, err := c.Exec(ctx, "cat", &specs.Process{Args: []string{"cat"}}, stdio.IO{}); !errors.Is(err, ErrAlreadyExists) {
		t.Errorf("second exec with a live id: %v, want ErrAlreadyExists", err)
	}
	if _, err := c.DeleteProcess(ctx, "cat"); err != nil {
		t.Fatal(err)
	}

	p, err = c.Exec(ctx, "instant", &specs.Process{Args: []string{"true"}}, stdio.IO{Stdout: io.Discard})
	if err != nil {
		t.Fatal(err)
	}
	e, err := p.Wait(ctx)
	if err != nil || e.Status != 3 {
		t.Errorf("instant exec: %+v, %v", e, err)
	}
}

func TestStateRulesAreEnforcedBeforeTheAgent(t *testing.T) {
	a := newFakeAgent(t, map[string]script{"c1/": func(p *fakeProc) uint32 { return 0 }})
	m := a.start(Options{})
	ctx := waitCtx(t)
	c, err := m.Create(ctx, CreateOptions{ID: "c1"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.Create(ctx, CreateOptions{ID: "c1"}); !errors.Is(err, ErrAlreadyExists) {
		t.Errorf("duplicate create: %v", err)
	}
	if err := c.Pause(ctx); !errors.Is(err, ErrInvalidState) {
		t.Errorf("pause of a created container: %v", err)
	}
	if _, err := c.Exec(ctx, "x", &specs.Process{}, stdio.IO{}); !errors.Is(err, ErrInvalidState) {
		t.Errorf("exec in a created container: %v", err)
	}
	if err := c.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	if err := c.Start(ctx); !errors.Is(err, ErrInvalidState) {
		t.Errorf("second start: %v", err)
	}
	if err := c.Resume(ctx); !errors.Is(err, ErrInvalidState) {
		t.Errorf("resume of a stopped container: %v", err)
	}
	a.mu.Lock()
	calls := strings.Join(a.calls, ",")
	a.mu.Unlock()
	if strings.Contains(calls, "pause") || strings.Contains(calls, "resume") || strings.Contains(calls, "exec") {
		t.Errorf("refused operations reached the agent: %s", calls)
	}
}

func TestPauseResumeUpdateStatsPids(t *testing.T) {
	release := make(chan struct{})
	a := newFakeAgent(t, map[string]script{"c1/": func(p *fakeProc) uint32 { <-release; return 0 }})
	m := a.start(Options{})
	ctx := waitCtx(t)
	c, err := m.Create(ctx, CreateOptions{ID: "c1"})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if err := c.Pause(ctx); err != nil || c.State() != Paused {
		t.Fatalf("pause: %v, state %s", err, c.State())
	}
	if err := c.Resume(ctx); err != nil || c.State() != Running {
		t.Fatalf("resume: %v, state %s", err, c.State())
	}
	limit := int64(1 << 20)
	if err := c.Update(ctx, &specs.LinuxResources{Memory: &specs.LinuxMemory{Limit: &limit}}); err != nil {
		t.Fatal(err)
	}
	st, err := c.Stats(ctx)
	if err != nil || st.GetMemory().GetUsage() != 1234 {
		t.Errorf("stats %v, %v", st, err)
	}
	ps, err := c.Pids(ctx)
	if err != nil || len(ps) != 1 || ps[0].GetPid() != 42 {
		t.Errorf("pids %v, %v", ps, err)
	}
	if err := c.Delete(ctx, false); !errors.Is(err, ErrInvalidState) {
		t.Errorf("delete of a running container without force: %v", err)
	}
	close(release)
	if _, err := c.Wait(ctx); err != nil {
		t.Fatal(err)
	}
}

func TestForceDeleteFailsPendingWaits(t *testing.T) {
	a := newFakeAgent(t, map[string]script{"c1/": func(p *fakeProc) uint32 { select {} }})
	m := a.start(Options{})
	ctx := waitCtx(t)
	c, err := m.Create(ctx, CreateOptions{ID: "c1"})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if err := c.Delete(ctx, true); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Wait(ctx); !errors.Is(err, ErrDeleted) {
		t.Errorf("wait after force delete: %v, want ErrDeleted", err)
	}
}

func TestOOMEventsAreCountedAndForwarded(t *testing.T) {
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
	if c.OOMKills() != 1 {
		t.Errorf("OOMKills = %d, want 1", c.OOMKills())
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
			c, err := m.Create(ctx, CreateOptions{ID: "c1", IO: stdio.IO{Stdout: &out, Stderr: io.Discard}})
			if err != nil {
				t.Fatal(err)
			}
			if err := c.Start(ctx); err != nil {
				t.Fatal(err)
			}
			e, err := c.Wait(ctx)
			if err != nil || e.Status != 7 || out.String() != "out\n" {
				t.Errorf("wait %+v %v, stdout %q", e, err, out.String())
			}
		})
	}
}

func TestAllowedTransitions(t *testing.T) {
	cases := []struct {
		from, to State
		ok       bool
	}{
		{Created, Running, true},
		{Created, Stopped, true},
		{Created, Deleted, true},
		{Created, Paused, false},
		{Running, Paused, true},
		{Running, Stopped, true},
		{Running, Deleted, false},
		{Running, Created, false},
		{Paused, Running, true},
		{Paused, Stopped, true},
		{Paused, Deleted, false},
		{Stopped, Deleted, true},
		{Stopped, Running, false},
		{Deleted, Created, false},
		{Deleted, Running, false},
	}
	for _, tc := range cases {
		if got := allowed(tc.from, tc.to); got != tc.ok {
			t.Errorf("%s -> %s allowed = %t, want %t", tc.from, tc.to, got, tc.ok)
		}
		var sm stateMachine
		sm.state = tc.from
		err := sm.transition(tc.to)
		if (err == nil) != tc.ok || (err != nil && !errors.Is(err, ErrInvalidState)) {
			t.Errorf("transition %s -> %s: %v", tc.from, tc.to, err)
		}
	}
}
