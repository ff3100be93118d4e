package container

import (
	"context"
	"errors"
	"net"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/ttrpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
)

// fakeProc is a scripted guest process: its stream connections by name.
type fakeProc struct {
	conns map[string]*net.UnixConn
}

// script plays a process and returns its exit status. The fake agent then half-closes the output streams and
// reports the exit, in that order, as the real agent must.
type script func(p *fakeProc) uint32

// fakeAgent serves the Containers API on a Unix socket and accepts stdio streams on another, standing in for
// the guest.
type fakeAgent struct {
	t        *testing.T
	scripts  map[string]script // by "container/exec"
	events   chan *agentv1.Event
	noEvents bool
	// breakEventsOnce ends the first events stream at once, before any event; breakEvents ends every one.
	breakEventsOnce, breakEvents bool
	// fail makes signals and removals fail on the host's side with this error, as the client's do when a request
	// runs into its timeout or the agent connection is gone (closed, or a write ran past its deadline).
	fail error
	// hang, when set, makes signals, removals and process lists wait that long on the host's side (or until their context ends)
	// and fail on a deadline, as a request to a hung agent runs into the request timeout.
	hang time.Duration
	// loseAnswers makes creates and execs reach the fake, which carries them out, and fail on the host's side on a
	// deadline, as a request whose answer came too late.
	loseAnswers bool
	// dropExits makes the fake report no exit events, as a guest that lost them (direct waits still answer).
	dropExits bool
	// answer, when set, is the agent's answer to signals, removals and updates, sent back over ttrpc as the
	// guest's is.
	answer error
	// longLists makes stats and process lists answer with more entries than the host takes.
	longLists bool
	// onSignal, when set, is told of each signal the host sends (a script can end on it).
	onSignal func(*agentv1.SignalProcessRequest)
	// onExec, when set, is called with each exec request before the fake starts the process or answers (set under mu).
	onExec func(*agentv1.ExecProcessRequest)
	// gate, when set, holds the next exec's start on the host's side (taken by it, under mu).
	gate *execGate

	stdioPath string
	mu        sync.Mutex
	cond      *sync.Cond
	streams   map[string]map[string]*net.UnixConn // key -> stream -> conn
	procs     map[string]*fakeProc
	exits     map[string]chan uint32
	calls     []string
	subs      int
	// execSpecs are the encoded process specs of the execs started, by "container/exec".
	execSpecs map[string][]byte
}

func newFakeAgent(t *testing.T, scripts map[string]script) *fakeAgent {
	a := &fakeAgent{t: t, scripts: scripts, events: make(chan *agentv1.Event, 64),
		streams: map[string]map[string]*net.UnixConn{}, procs: map[string]*fakeProc{}, exits: map[string]chan uint32{}}
	a.cond = sync.NewCond(&a.mu)
	return a
}

// start serves the fake and returns a manager talking to it.
func (a *fakeAgent) start(opts Options) *Manager {
	t := a.t
	dir := t.TempDir()
	a.stdioPath = filepath.Join(dir, "stdio.sock")
	sl, err := net.Listen("unix", a.stdioPath)
	if err != nil {
		t.Fatal(err)
	}
	go a.acceptStreams(sl)
	apiPath := filepath.Join(dir, "api.sock")
	al, err := net.Listen("unix", apiPath)
	if err != nil {
		t.Fatal(err)
	}
	srv, err := ttrpc.NewServer()
	if err != nil {
		t.Fatal(err)
	}
	agentv1.RegisterContainersService(srv, a)
	go func() { _ = srv.Serve(context.Background(), al) }()
	conn, err := net.Dial("unix", apiPath)
	if err != nil {
		t.Fatal(err)
	}
	client := ttrpc.NewClient(conn)
	m := NewManager(failingClient{agentv1.NewContainersClient(client), a}, a, opts)
	t.Cleanup(func() {
		_ = m.Close()
		_ = client.Close()
		_ = srv.Close()
		_ = sl.Close()
	})
	return m
}

func (a *fakeAgent) DialVsock(ctx context.Context, port uint32) (net.Conn, error) {
	var d net.Dialer
	return d.DialContext(ctx, "unix", a.stdioPath)
}

func (a *fakeAgent) acceptStreams(l net.Listener) {
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		go func() {
			var line []byte
			b := make([]byte, 1)
			for {
				if _, err := c.Read(b); err != nil {
					_ = c.Close()
					return
				}
				if b[0] == '\n' {
					break
				}
				line = append(line, b[0])
			}
			key, stream, _ := strings.Cut(string(line), " ")
			a.mu.Lock()
			if a.streams[key] == nil {
				a.streams[key] = map[string]*net.UnixConn{}
			}
			a.streams[key][stream] = c.(*net.UnixConn)
			a.cond.Broadcast()
			a.mu.Unlock()
		}()
	}
}

// takeStreams waits for the streams the request announces, as the agent does.
func (a *fakeAgent) takeStreams(sp *agentv1.Stdio) *fakeProc {
	var want []string
	if sp.GetTerminal() {
		want = []string{"tty"}
	} else {
		for _, s := range []struct {
			ok   bool
			name string
		}{{sp.GetStdin(), "stdin"}, {sp.GetStdout(), "stdout"}, {sp.GetStderr(), "stderr"}} {
			if s.ok {
				want = append(want, s.name)
			}
		}
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	for len(a.streams[sp.GetStdioKey()]) < len(want) {
		a.cond.Wait()
	}
	p := &fakeProc{conns: a.streams[sp.GetStdioKey()]}
	delete(a.streams, sp.GetStdioKey())
	return p
}

func (a *fakeAgent) record(call string) {
	a.mu.Lock()
	a.calls = append(a.calls, call)
	a.mu.Unlock()
}

// recorded returns the calls recorded so far.
func (a *fakeAgent) recorded() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return slices.Clone(a.calls)
}

// run plays the process's script, then half-closes its output and reports its exit.
func (a *fakeAgent) run(cid, exec string, p *fakeProc) {
	key := cid + "/" + exec
	s := a.scripts[key]
	var status uint32
	if s != nil {
		status = s(p)
	}
	for name, c := range p.conns {
		if name != "stdin" {
			_ = c.CloseWrite()
		}
	}
	a.mu.Lock()
	ch := a.exits[key]
	a.mu.Unlock()
	ch <- status
	a.mu.Lock()
	drop := a.dropExits
	a.mu.Unlock()
	if drop {
		return
	}
	// The pids CreateContainer and ExecProcess answered with, as the agent names the process it started.
	pid := uint32(42)
	if exec != "" {
		pid = 43
	}
	a.events <- &agentv1.Event{Event: &agentv1.Event_Exit{Exit: &agentv1.ExitEvent{
		ContainerId: cid, ExecId: exec, Pid: pid, ExitStatus: status, ExitedAt: timestamppb.Now()}}}
}

func (a *fakeAgent) CreateContainer(_ context.Context, r *agentv1.CreateContainerRequest) (*agentv1.CreateContainerResponse, error) {
	a.record("create " + r.GetContainerId())
	p := a.takeStreams(r.GetStdio())
	a.mu.Lock()
	a.procs[r.GetContainerId()+"/"] = p
	a.exits[r.GetContainerId()+"/"] = make(chan uint32, 1)
	a.mu.Unlock()
	return &agentv1.CreateContainerResponse{Pid: 42}, nil
}

func (a *fakeAgent) StartContainer(_ context.Context, r *agentv1.StartContainerRequest) (*agentv1.StartContainerResponse, error) {
	a.record("start " + r.GetContainerId())
	a.mu.Lock()
	p := a.procs[r.GetContainerId()+"/"]
	a.mu.Unlock()
	if p == nil {
		return nil, status.Error(codes.NotFound, "no such container")
	}
	go a.run(r.GetContainerId(), "", p)
	return &agentv1.StartContainerResponse{}, nil
}

func (a *fakeAgent) ExecProcess(_ context.Context, r *agentv1.ExecProcessRequest) (*agentv1.ExecProcessResponse, error) {
	a.record("exec " + r.GetContainerId() + "/" + r.GetExecId())
	a.mu.Lock()
	onExec := a.onExec
	a.mu.Unlock()
	if onExec != nil {
		onExec(r)
	}
	p := a.takeStreams(r.GetStdio())
	key := r.GetContainerId() + "/" + r.GetExecId()
	a.mu.Lock()
	a.exits[key] = make(chan uint32, 1)
	if a.execSpecs == nil {
		a.execSpecs = map[string][]byte{}
	}
	a.execSpecs[key] = r.GetProcess()
	a.mu.Unlock()
	if r.GetExecId() == "instant" {
		// The exit is reported before the answer: the host must already be listening for it.
		a.run(r.GetContainerId(), r.GetExecId(), p)
	} else {
		go a.run(r.GetContainerId(), r.GetExecId(), p)
	}
	return &agentv1.ExecProcessResponse{Pid: 43}, nil
}

func (a *fakeAgent) SignalProcess(_ context.Context, r *agentv1.SignalProcessRequest) (*agentv1.SignalProcessResponse, error) {
	a.record("signal " + r.GetContainerId())
	if a.onSignal != nil {
		a.onSignal(r)
	}
	if err := a.answered(); err != nil {
		return nil, err
	}
	return &agentv1.SignalProcessResponse{}, nil
}

func (a *fakeAgent) WaitProcess(ctx context.Context, r *agentv1.WaitProcessRequest) (*agentv1.WaitProcessResponse, error) {
	a.record("wait " + r.GetContainerId() + "/" + r.GetExecId())
	a.mu.Lock()
	ch := a.exits[r.GetContainerId()+"/"+r.GetExecId()]
	a.mu.Unlock()
	if ch == nil {
		return nil, status.Error(codes.NotFound, "no such process")
	}
	select {
	case s := <-ch:
		ch <- s
		return &agentv1.WaitProcessResponse{ExitStatus: s, ExitedAt: timestamppb.Now()}, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

func (a *fakeAgent) RemoveContainer(_ context.Context, r *agentv1.RemoveContainerRequest) (*agentv1.RemoveContainerResponse, error) {
	a.record("remove " + r.GetContainerId())
	if err := a.answered(); err != nil {
		return nil, err
	}
	return &agentv1.RemoveContainerResponse{}, nil
}

func (a *fakeAgent) answered() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.answer
}

func (a *fakeAgent) CloseStdin(context.Context, *agentv1.CloseStdinRequest) (*agentv1.CloseStdinResponse, error) {
	a.record("closestdin")
	return &agentv1.CloseStdinResponse{}, nil
}

func (a *fakeAgent) ResizeTTY(_ context.Context, r *agentv1.ResizeTTYRequest) (*agentv1.ResizeTTYResponse, error) {
	a.record("resize")
	return &agentv1.ResizeTTYResponse{}, nil
}

func (a *fakeAgent) PauseContainer(context.Context, *agentv1.PauseContainerRequest) (*agentv1.PauseContainerResponse, error) {
	a.record("pause")
	return &agentv1.PauseContainerResponse{}, nil
}

func (a *fakeAgent) ResumeContainer(context.Context, *agentv1.ResumeContainerRequest) (*agentv1.ResumeContainerResponse, error) {
	a.record("resume")
	return &agentv1.ResumeContainerResponse{}, nil
}

func (a *fakeAgent) UpdateContainer(context.Context, *agentv1.UpdateContainerRequest) (*agentv1.UpdateContainerResponse, error) {
	a.record("update")
	if err := a.answered(); err != nil {
		return nil, err
	}
	return &agentv1.UpdateContainerResponse{}, nil
}

func (a *fakeAgent) StatsContainer(context.Context, *agentv1.StatsContainerRequest) (*agentv1.StatsContainerResponse, error) {
	if a.longLists {
		return &agentv1.StatsContainerResponse{Io: &agentv1.IOStats{Usage: make([]*agentv1.IOEntry, maxIODevices+1)}}, nil
	}
	return &agentv1.StatsContainerResponse{Memory: &agentv1.MemoryStats{Usage: 1234}}, nil
}

func (a *fakeAgent) ListProcesses(context.Context, *agentv1.ListProcessesRequest) (*agentv1.ListProcessesResponse, error) {
	if a.longLists {
		ps := make([]*agentv1.ProcessInfo, maxProcesses+1)
		for i := range ps {
			ps[i] = &agentv1.ProcessInfo{Pid: uint32(i + 1)}
		}
		return &agentv1.ListProcessesResponse{Processes: ps}, nil
	}
	// 43 claims an exec id the host never started: a guest's word the host must not pass on.
	return &agentv1.ListProcessesResponse{Processes: []*agentv1.ProcessInfo{{Pid: 42}, {Pid: 43, ExecId: "not-an-exec"}}}, nil
}

func (a *fakeAgent) Events(ctx context.Context, _ *agentv1.EventsRequest, s agentv1.Containers_EventsServer) error {
	a.mu.Lock()
	a.subs++
	first := a.subs == 1
	a.mu.Unlock()
	if a.noEvents {
		return status.Error(codes.Unimplemented, "no events here")
	}
	if first && a.breakEventsOnce || a.breakEvents {
		return errors.New("events stream broken on purpose")
	}
	for {
		select {
		case ev := <-a.events:
			if err := s.Send(ev); err != nil {
				return err
			}
		case <-ctx.Done():
			return nil
		}
	}
}

func (a *fakeAgent) sendOOM(cid string) {
	a.events <- &agentv1.Event{Event: &agentv1.Event_Oom{Oom: &agentv1.OOMEvent{ContainerId: cid}}}
}

// started creates a container with opts in m and starts it.
func started(t *testing.T, ctx context.Context, m *Manager, opts CreateOptions) *Container {
	t.Helper()
	c, err := m.Create(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Start(ctx); err != nil {
		t.Fatal(err)
	}
	return c
}

func waitCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// failingClient fails signals, removals and process lists with the fake agent's fail error, when set, without
// sending them, or after its hang, and holds an exec's start at the fake agent's gate.
type failingClient struct {
	agentv1.ContainersClient
	a *fakeAgent
}

func (c failingClient) err(ctx context.Context) error {
	c.a.mu.Lock()
	fail, hang := c.a.fail, c.a.hang
	c.a.mu.Unlock()
	if hang > 0 {
		select {
		case <-time.After(hang):
			return status.Error(codes.DeadlineExceeded, "context deadline exceeded")
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return fail
}

func (c failingClient) SignalProcess(ctx context.Context, r *agentv1.SignalProcessRequest) (*agentv1.SignalProcessResponse, error) {
	if err := c.err(ctx); err != nil {
		return nil, err
	}
	return c.ContainersClient.SignalProcess(ctx, r)
}

func (c failingClient) ExecProcess(ctx context.Context, r *agentv1.ExecProcessRequest) (*agentv1.ExecProcessResponse, error) {
	c.a.mu.Lock()
	g := c.a.gate
	c.a.gate = nil
	c.a.mu.Unlock()
	if g != nil {
		if err := g.pass(); err != nil {
			return nil, err
		}
	}
	resp, err := c.ContainersClient.ExecProcess(ctx, r)
	if err == nil && c.lost() {
		return nil, status.Error(codes.DeadlineExceeded, "context deadline exceeded")
	}
	return resp, err
}

func (c failingClient) ListProcesses(ctx context.Context, r *agentv1.ListProcessesRequest) (*agentv1.ListProcessesResponse, error) {
	if err := c.err(ctx); err != nil {
		return nil, err
	}
	return c.ContainersClient.ListProcesses(ctx, r)
}

func (c failingClient) lost() bool {
	c.a.mu.Lock()
	defer c.a.mu.Unlock()
	return c.a.loseAnswers
}

func (c failingClient) CreateContainer(ctx context.Context, r *agentv1.CreateContainerRequest) (*agentv1.CreateContainerResponse, error) {
	resp, err := c.ContainersClient.CreateContainer(ctx, r)
	if err == nil && c.lost() {
		return nil, status.Error(codes.DeadlineExceeded, "context deadline exceeded")
	}
	return resp, err
}

func (c failingClient) RemoveContainer(ctx context.Context, r *agentv1.RemoveContainerRequest) (*agentv1.RemoveContainerResponse, error) {
	if err := c.err(ctx); err != nil {
		return nil, err
	}
	return c.ContainersClient.RemoveContainer(ctx, r)
}
