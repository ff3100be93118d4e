package container

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/containerd/ttrpc"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/kiln-runtime/kiln/proto/lifecycle"
	"github.com/kiln-runtime/kiln/runtime/stdio"
	"github.com/kiln-runtime/kiln/vm"
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
	if c.State() != lifecycle.Created || c.Init().Pid() != 42 {
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
	if c.State() != lifecycle.Stopped {
		t.Errorf("state after exit %s, want stopped", c.State())
	}
	if _, err := c.Delete(ctx, false); err != nil {
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
	c := started(t, ctx, m, CreateOptions{ID: "c1", IO: stdio.IO{Stdout: &out}})
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
	c := started(t, ctx, m, CreateOptions{ID: "c1"})
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
	c := started(t, ctx, m, CreateOptions{ID: "c1"})
	if err := c.Pause(ctx); err != nil || c.State() != lifecycle.Paused {
		t.Fatalf("pause: %v, state %s", err, c.State())
	}
	if err := c.Resume(ctx); err != nil || c.State() != lifecycle.Running {
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
	if err != nil || len(ps) != 2 || ps[0].GetPid() != 42 || ps[1].GetPid() != 43 || ps[1].GetExecId() != "" {
		t.Errorf("pids %v, %v; want 42 and 43, without the exec id the host does not hold", ps, err)
	}
	if _, err := c.Delete(ctx, false); !errors.Is(err, ErrInvalidState) {
		t.Errorf("delete of a running container without force: %v", err)
	}
	close(release)
	if _, err := c.Wait(ctx); err != nil {
		t.Fatal(err)
	}
}

// Lists longer than any guest of Kiln's has are refused, not copied into containerd's replies.
func TestLongListsFromTheGuestAreRefused(t *testing.T) {
	release := make(chan struct{})
	a := newFakeAgent(t, map[string]script{"c1/": func(p *fakeProc) uint32 { <-release; return 0 }})
	a.longLists = true
	m := a.start(Options{})
	ctx := waitCtx(t)
	c := started(t, ctx, m, CreateOptions{ID: "c1"})
	if _, err := c.Stats(ctx); err == nil || !strings.Contains(err.Error(), "block devices, more than") {
		t.Errorf("stats with %d block devices: %v, want a refusal", maxIODevices+1, err)
	}
	if _, err := c.Pids(ctx); err == nil || !strings.Contains(err.Error(), "processes, more than") {
		t.Errorf("pids with %d processes: %v, want a refusal", maxProcesses+1, err)
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
	c := started(t, ctx, m, CreateOptions{ID: "c1"})
	if _, err := c.Delete(ctx, true); err != nil {
		t.Fatal(err)
	}
	if e, err := c.Wait(ctx); !errors.Is(err, ErrDeleted) || e.Status != 137 {
		t.Errorf("wait after force delete: %+v, %v, want a SIGKILL exit and ErrDeleted", e, err)
	}
}

// An exec's terminal sized before its start (nerdctl's `exec -t`) starts at that size; once it runs, a resize
// goes to the guest.
func TestResizeBeforeExecStart(t *testing.T) {
	a := newFakeAgent(t, map[string]script{"c1/": func(p *fakeProc) uint32 { select {} }, "c1/e1": func(p *fakeProc) uint32 { select {} }})
	m := a.start(Options{})
	ctx := waitCtx(t)
	c := started(t, ctx, m, CreateOptions{ID: "c1"})
	p, err := c.AddExec("e1", &specs.Process{Args: []string{"sh"}, Terminal: true}, stdio.IO{Terminal: true}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Resize(ctx, 120, 40); err != nil {
		t.Fatalf("resize before start: %v", err)
	}
	if err := p.Start(ctx, nil); err != nil {
		t.Fatal(err)
	}
	a.mu.Lock()
	raw := a.execSpecs["c1/e1"]
	a.mu.Unlock()
	var got specs.Process
	if err := json.Unmarshal(raw, &got); err != nil {
		t.Fatal(err)
	}
	if got.ConsoleSize == nil || got.ConsoleSize.Width != 120 || got.ConsoleSize.Height != 40 || len(got.Args) != 1 {
		t.Errorf("the exec started with %+v (size %+v), want the size it was given, 120x40", got, got.ConsoleSize)
	}
	if slices.Contains(a.recorded(), "resize") {
		t.Error("a resize before the start went to the guest")
	}
	if err := p.Resize(ctx, 80, 24); err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(a.recorded(), "resize") {
		t.Error("a resize of the running exec did not reach the guest")
	}
}

func TestDeleteAnExecThatNeverRan(t *testing.T) {
	release := make(chan struct{})
	a := newFakeAgent(t, map[string]script{"c1/": func(p *fakeProc) uint32 { <-release; return 0 }})
	m := a.start(Options{})
	ctx := waitCtx(t)
	c := started(t, ctx, m, CreateOptions{ID: "c1"})
	io := &closer{}
	p, err := c.AddExec("e1", &specs.Process{Args: []string{"x"}}, stdio.IO{}, io)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Signal(ctx, 9); !errors.Is(err, ErrInvalidState) {
		t.Errorf("signal to an exec that never ran: %v", err)
	}
	e, err := c.DeleteProcess(ctx, "e1")
	if err != nil || e.Status != 137 {
		t.Errorf("delete: %+v, %v, want a SIGKILL exit", e, err)
	}
	if p.State() != lifecycle.Deleted || io.count() != 1 {
		t.Errorf("after delete: state %s, IO released %d times", p.State(), io.count())
	}
	if _, err := c.Process("e1"); !errors.Is(err, ErrNotFound) {
		t.Errorf("process after delete: %v", err)
	}
	close(release)
	if _, err := c.Wait(ctx); err != nil {
		t.Fatal(err)
	}
}

// A guest that dies (QEMU killed, a panic) must not leave waiters hanging: every running process is reported
// killed, and its container can still be deleted without the agent.
func TestLostGuestReportsEveryProcessKilled(t *testing.T) {
	a := newFakeAgent(t, map[string]script{"c1/": func(p *fakeProc) uint32 { select {} }, "c1/e1": func(p *fakeProc) uint32 { select {} }})
	var mu sync.Mutex
	exits := map[string]uint32{}
	m := a.start(Options{OnExit: func(p *Process, e Exit) {
		mu.Lock()
		exits[p.ID()] = e.Status
		mu.Unlock()
	}})
	ctx := waitCtx(t)
	c := started(t, ctx, m, CreateOptions{ID: "c1"})
	p, err := c.Exec(ctx, "e1", &specs.Process{Args: []string{"x"}}, stdio.IO{})
	if err != nil {
		t.Fatal(err)
	}
	m.Lost(errors.New("VM killed"))
	for _, proc := range []*Process{c.Init(), p} {
		if e, err := proc.Wait(ctx); err != nil || e.Status != 137 {
			t.Errorf("wait for %q after the guest was lost: %+v, %v, want status 137", proc.ID(), e, err)
		}
	}
	mu.Lock()
	if exits[""] != 137 || exits["e1"] != 137 {
		t.Errorf("exits reported %v, want 137 for init and e1", exits)
	}
	mu.Unlock()
	a.mu.Lock()
	before := len(a.calls)
	a.mu.Unlock()
	if _, err := c.Delete(ctx, false); err != nil {
		t.Fatalf("delete after the guest was lost: %v", err)
	}
	a.mu.Lock()
	after := len(a.calls)
	a.mu.Unlock()
	if after != before {
		t.Errorf("delete asked the agent of a lost guest")
	}
	if _, err := m.Create(ctx, CreateOptions{ID: "c2"}); !errors.Is(err, ErrClosed) {
		t.Errorf("create after the guest was lost: %v, want ErrClosed", err)
	}
}

// A hung agent (its requests run into the request timeout while the VM lives), or an agent connection that is
// gone (the guest stopped reading it, and a write ran past its deadline, which closed it), must not leave
// containers that can be neither killed nor deleted: a SIGKILL or a removal that fails so gives the guest up
// (Abandon stops the VM), every process is reported killed, and the kill and the deletion succeed without the
// agent. Other signals and other failures stay errors.
func TestHungAgentIsAbandonedOnKillAndDelete(t *testing.T) {
	for _, fail := range []error{
		status.Error(codes.DeadlineExceeded, "context deadline exceeded"),
		ttrpc.ErrClosed,
		fmt.Errorf("the guest took no request for 30s: %w", os.ErrDeadlineExceeded),
	} {
		t.Run(fail.Error(), func(t *testing.T) { testAbandon(t, fail) })
	}
}

func testAbandon(t *testing.T, fail error) {
	tests := []struct {
		name string
		// act is what the caller does to a running container whose agent hangs.
		act func(ctx context.Context, c *Container, exec *Process) error
	}{
		{"SIGKILL to the container", func(ctx context.Context, c *Container, _ *Process) error { return c.Kill(ctx, 9, false) }},
		{"SIGKILL to every process", func(ctx context.Context, c *Container, _ *Process) error { return c.Kill(ctx, 9, true) }},
		{"SIGKILL to an exec", func(ctx context.Context, _ *Container, p *Process) error { return p.Signal(ctx, 9) }},
		{"forced delete", func(ctx context.Context, c *Container, _ *Process) error { _, err := c.Delete(ctx, true); return err }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a := newFakeAgent(t, map[string]script{"c1/": func(p *fakeProc) uint32 { select {} }, "c1/e1": func(p *fakeProc) uint32 { select {} }})
			var mu sync.Mutex
			var abandoned []error
			exits := map[string]uint32{}
			m := a.start(Options{
				OnExit: func(p *Process, e Exit) {
					mu.Lock()
					exits[p.ID()] = e.Status
					mu.Unlock()
				},
				Abandon: func(reason error) {
					mu.Lock()
					abandoned = append(abandoned, reason)
					mu.Unlock()
				},
			})
			ctx := waitCtx(t)
			c := started(t, ctx, m, CreateOptions{ID: "c1"})
			p, err := c.Exec(ctx, "e1", &specs.Process{Args: []string{"x"}}, stdio.IO{})
			if err != nil {
				t.Fatal(err)
			}
			a.mu.Lock()
			a.fail = fail
			a.mu.Unlock()
			if err := c.Kill(ctx, 15, false); err == nil {
				t.Error("SIGTERM through a hung agent succeeded, want its error")
			}
			if err := tt.act(ctx, c, p); err != nil {
				t.Fatalf("through a hung agent: %v, want success once the guest is given up", err)
			}
			for _, proc := range []*Process{c.Init(), p} {
				if e, err := proc.Wait(ctx); e.Status != 137 || (err != nil && !errors.Is(err, ErrDeleted)) {
					t.Errorf("wait for %q: %+v, %v, want status 137", proc.ID(), e, err)
				}
			}
			// A forced delete deleted it: another finds nothing to delete.
			if _, err := c.Delete(ctx, false); err != nil && !(tt.name == "forced delete" && errors.Is(err, ErrNotFound)) {
				t.Errorf("delete after the guest was given up: %v", err)
			}
			mu.Lock()
			defer mu.Unlock()
			if len(abandoned) != 1 || !strings.Contains(abandoned[0].Error(), "did not answer") {
				t.Errorf("Abandon called with %v, want once, saying the agent did not answer", abandoned)
			}
			if exits[""] != 137 || exits["e1"] != 137 {
				t.Errorf("exits reported %v, want 137 for init and e1", exits)
			}
		})
	}
}

// A SIGKILL failing on a connection the pod's own stop closed gives nothing up: the stop ends the VM its way.
func TestClosedManagerAbandonsNothing(t *testing.T) {
	a := newFakeAgent(t, map[string]script{"c1/": func(p *fakeProc) uint32 { select {} }})
	abandoned := make(chan error, 1)
	m := a.start(Options{Abandon: func(reason error) { abandoned <- reason }})
	ctx := waitCtx(t)
	c := started(t, ctx, m, CreateOptions{ID: "c1"})
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	a.mu.Lock()
	a.fail = ttrpc.ErrClosed
	a.mu.Unlock()
	if err := c.Kill(ctx, 9, false); !errors.Is(err, ttrpc.ErrClosed) {
		t.Errorf("SIGKILL after Close: %v, want the closed connection's error", err)
	}
	select {
	case reason := <-abandoned:
		t.Errorf("Abandon called on a closed manager: %v", reason)
	default:
	}
}

// A guest the host's OOM killer ended reports an OOM kill of each container still running before their exits, as
// runc's would be reported (kubelet says OOMKilled); a guest lost otherwise reports none, nor does a container
// that had exited.
func TestGuestLostToOOM(t *testing.T) {
	for _, tc := range []struct {
		name   string
		reason error
		want   []string
	}{
		{name: "OOM", reason: fmt.Errorf("VM p ended: %w", vm.ErrOOMKilled), want: []string{"exit c2/", "oom c1", "oom c3", "exit c1/", "exit c1/e1", "exit c3/"}},
		{name: "killed", reason: errors.New("VM p ended: signal: killed"), want: []string{"exit c2/", "exit c1/", "exit c1/e1", "exit c3/"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			forever := func(p *fakeProc) uint32 { select {} }
			a := newFakeAgent(t, map[string]script{"c1/": forever, "c1/e1": forever, "c2/": func(*fakeProc) uint32 { return 0 }, "c3/": forever})
			var mu sync.Mutex
			var events []string
			m := a.start(Options{
				OnEvent: func(e Event) {
					if e.Kind == EventOOM {
						mu.Lock()
						events = append(events, "oom "+e.ContainerID)
						mu.Unlock()
					}
				},
				OnExit: func(p *Process, e Exit) {
					mu.Lock()
					events = append(events, "exit "+p.Container().ID()+"/"+p.ID())
					mu.Unlock()
				},
			})
			ctx := waitCtx(t)
			c2 := started(t, ctx, m, CreateOptions{ID: "c2"})
			if _, err := c2.Wait(ctx); err != nil {
				t.Fatal(err)
			}
			c1 := started(t, ctx, m, CreateOptions{ID: "c1"})
			e1, err := c1.Exec(ctx, "e1", &specs.Process{Args: []string{"x"}}, stdio.IO{})
			if err != nil {
				t.Fatal(err)
			}
			c3 := started(t, ctx, m, CreateOptions{ID: "c3"})
			m.Lost(tc.reason)
			for _, p := range []*Process{c1.Init(), e1, c3.Init()} {
				if _, err := p.Wait(ctx); err != nil {
					t.Fatal(err)
				}
			}
			mu.Lock()
			defer mu.Unlock()
			// Exits come in no particular order among themselves; each OOM comes before every exit after it.
			got := slices.Clone(events)
			slices.Sort(got[1:])
			want := slices.Clone(tc.want)
			slices.Sort(want[1:])
			if !slices.Equal(got, want) {
				t.Errorf("events %v, want %v", events, tc.want)
			}
			lastOOM, firstLostExit := -1, len(events)
			for i, e := range events {
				if strings.HasPrefix(e, "oom ") {
					lastOOM = i
				} else if i > 0 && i < firstLostExit {
					firstLostExit = i
				}
			}
			if lastOOM > firstLostExit {
				t.Errorf("events %v: an OOM after an exit of the lost guest", events)
			}
		})
	}
}

// A container's host pid (its stand-in's) finds its init's guest pid while the init has not stopped: the
// namespaces CRI names by the host pid are joined in the guest by the guest's.
func TestGuestInitPid(t *testing.T) {
	a := newFakeAgent(t, map[string]script{"c1/": func(*fakeProc) uint32 { return 0 }})
	m := a.start(Options{})
	ctx := waitCtx(t)
	c, err := m.Create(ctx, CreateOptions{ID: "c1", Spec: []byte(`{}`), Rootfs: "c1/rootfs", HostPid: 4242})
	if err != nil {
		t.Fatal(err)
	}
	if c.HostPid() != 4242 {
		t.Errorf("host pid %d, want 4242", c.HostPid())
	}
	for _, pid := range []uint32{0, 42, 4243} {
		if g, ok := m.GuestInitPid(pid); ok {
			t.Errorf("host pid %d found guest pid %d", pid, g)
		}
	}
	if g, ok := m.GuestInitPid(4242); !ok || g != 42 {
		t.Errorf("guest init pid of 4242: %d, %v; want 42", g, ok)
	}
	if err := c.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	if g, ok := m.GuestInitPid(4242); ok {
		t.Errorf("a stopped init's guest pid %d found", g)
	}
}
