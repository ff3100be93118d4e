package container

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/opencontainers/cgroups"
	"github.com/opencontainers/runc/libcontainer"
	"github.com/opencontainers/runc/libcontainer/configs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/sirupsen/logrus"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/kiln-runtime/kiln/agent/stdio"
	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
	"github.com/kiln-runtime/kiln/proto/lifecycle"
)

// inertContainer stands in for a libcontainer container and does nothing on the host: it starts no process and
// lists none, so nothing is signalled either.
type inertContainer struct {
	mu     sync.Mutex
	config configs.Config
	calls  []string
}

func (c *inertContainer) record(call string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.calls = append(c.calls, call)
	return nil
}

func (c *inertContainer) Start(*libcontainer.Process) error {
	_ = c.record("start")
	return errors.New("the fuzzer starts no process")
}
func (c *inertContainer) Exec() error               { return c.record("exec") }
func (c *inertContainer) Signal(os.Signal) error    { return c.record("signal") }
func (c *inertContainer) Processes() ([]int, error) { return nil, c.record("processes") }
func (c *inertContainer) Pause() error              { return c.record("pause") }
func (c *inertContainer) Resume() error             { return c.record("resume") }
func (c *inertContainer) Destroy() error            { return c.record("destroy") }
func (c *inertContainer) Config() configs.Config {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.config
}
func (c *inertContainer) Set(cfg configs.Config) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.config = cfg
	return nil
}

type inertReaper struct{}

func (inertReaper) Hold() func()           { return func() {} }
func (inertReaper) Claim(int) func()       { return func() {} }
func (n podNetPath) Path() (string, error) { return string(n), nil }

func (podNetPath) SetSysctls(map[string]string) error { return nil }
func (n podNetPath) Sysfs() (string, error)           { return string(n) + ".sys", nil }

type podNetPath string

// fuzzService is a service on temporary directories holding four containers that run nothing: "created" (never
// started), "running" (with a running exec e1 and a stopped exec e2), "paused" and "stopped".
func fuzzService(t *testing.T) *Service {
	dir := t.TempDir()
	shared := filepath.Join(dir, "shared")
	etc := filepath.Join(shared, "c", "rootfs", "etc")
	if err := os.MkdirAll(etc, 0o755); err != nil {
		t.Fatal(err)
	}
	for name, content := range map[string]string{
		"passwd": "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n",
		"group":  "root:x:0:\nusers:x:100:user\n",
	} {
		if err := os.WriteFile(filepath.Join(etc, name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	cgroupDir := filepath.Join(dir, "cgroup")
	if err := os.CopyFS(cgroupDir, os.DirFS("testdata/cgroup")); err != nil {
		t.Fatal(err)
	}
	// The cgroup library opens the cgroup root once, on its first write, and keeps it: a write here (refused,
	// this is no cgroup file system) keeps that descriptor out of the handlers' count.
	_ = cgroups.WriteFile(cgroupDir, "cgroup.kill", "1")
	l := logrus.New()
	l.SetOutput(io.Discard)
	noPivot := true
	s, err := New(logrus.NewEntry(l), Config{StateDir: filepath.Join(dir, "state"), SharedDir: shared,
		Stdio: stdio.NewHub(stdio.Config{}), Reaper: inertReaper{}, StdioTimeout: 1, NoPivotRoot: &noPivot,
		PodNetNS: podNetPath(filepath.Join(dir, "podns"))})
	if err != nil {
		t.Fatal(err)
	}
	proc := func(execID string, table lifecycle.Table, pid int, states ...lifecycle.State) *process {
		p := &process{execID: execID, lp: &libcontainer.Process{}, pid: pid, sm: lifecycle.New(table),
			done: make(chan struct{})}
		for _, st := range states {
			if err := p.sm.Transition(st); err != nil {
				t.Fatal(err)
			}
		}
		if pid != 0 {
			if p.io, err = newProcessIO(s.log, &agentv1.Stdio{}, nil, p.lp); err != nil {
				t.Fatal(err)
			}
		}
		if p.sm.State() == lifecycle.Stopped {
			p.exitStatus = 3
			close(p.done)
		}
		return p
	}
	for _, c := range []struct {
		id     string
		states []lifecycle.State
	}{
		{"created", nil},
		{"running", []lifecycle.State{lifecycle.Running}},
		{"paused", []lifecycle.State{lifecycle.Running, lifecycle.Paused}},
		{"stopped", []lifecycle.State{lifecycle.Running, lifecycle.Stopped}},
	} {
		pid := 0
		if len(c.states) > 0 {
			pid = 4000 + len(s.containers)
		}
		ctr := &container{id: c.id, rootfs: filepath.Join(shared, "c", "rootfs"), cgroupDir: cgroupDir,
			lc:   &inertContainer{config: configs.Config{Cgroups: &cgroups.Cgroup{Resources: &cgroups.Resources{}}}},
			init: proc("", lifecycle.Init(), pid, c.states...), execs: map[string]*process{}}
		if c.id == "running" {
			ctr.execs["e1"] = proc("e1", lifecycle.Exec(), 5001, lifecycle.Running)
			ctr.execs["e2"] = proc("e2", lifecycle.Exec(), 5002, lifecycle.Running, lifecycle.Stopped)
		}
		s.containers[c.id] = ctr
	}
	return s
}

// fuzzMethod is one handler of the Containers service as ttrpc calls it: decode the request, call.
type fuzzMethod struct {
	name string
	req  func() proto.Message
	call func(ctx context.Context, s *Service, req proto.Message) (any, error)
}

func method[Req proto.Message, Resp any](name string, newReq func() Req, h func(*Service, context.Context, Req) (Resp, error)) fuzzMethod {
	return fuzzMethod{name: name, req: func() proto.Message { return newReq() },
		call: func(ctx context.Context, s *Service, req proto.Message) (any, error) { return h(s, ctx, req.(Req)) }}
}

// fuzzMethods are every unary handler of the service; Events is a stream with no request to speak of.
var fuzzMethods = []fuzzMethod{
	method("CreateContainer", func() *agentv1.CreateContainerRequest { return &agentv1.CreateContainerRequest{} }, (*Service).CreateContainer),
	method("StartContainer", func() *agentv1.StartContainerRequest { return &agentv1.StartContainerRequest{} }, (*Service).StartContainer),
	method("ExecProcess", func() *agentv1.ExecProcessRequest { return &agentv1.ExecProcessRequest{} }, (*Service).ExecProcess),
	method("SignalProcess", func() *agentv1.SignalProcessRequest { return &agentv1.SignalProcessRequest{} }, (*Service).SignalProcess),
	method("WaitProcess", func() *agentv1.WaitProcessRequest { return &agentv1.WaitProcessRequest{} }, (*Service).WaitProcess),
	method("RemoveContainer", func() *agentv1.RemoveContainerRequest { return &agentv1.RemoveContainerRequest{} }, (*Service).RemoveContainer),
	method("CloseStdin", func() *agentv1.CloseStdinRequest { return &agentv1.CloseStdinRequest{} }, (*Service).CloseStdin),
	method("ResizeTTY", func() *agentv1.ResizeTTYRequest { return &agentv1.ResizeTTYRequest{} }, (*Service).ResizeTTY),
	method("PauseContainer", func() *agentv1.PauseContainerRequest { return &agentv1.PauseContainerRequest{} }, (*Service).PauseContainer),
	method("ResumeContainer", func() *agentv1.ResumeContainerRequest { return &agentv1.ResumeContainerRequest{} }, (*Service).ResumeContainer),
	method("UpdateContainer", func() *agentv1.UpdateContainerRequest { return &agentv1.UpdateContainerRequest{} }, (*Service).UpdateContainer),
	method("StatsContainer", func() *agentv1.StatsContainerRequest { return &agentv1.StatsContainerRequest{} }, (*Service).StatsContainer),
	method("ListProcesses", func() *agentv1.ListProcessesRequest { return &agentv1.ListProcessesRequest{} }, (*Service).ListProcesses),
}

// FuzzContainersRequests sends the Containers service sequences of arbitrary requests, each decoded as ttrpc
// decodes it, against containers that run nothing. Every handler answers with a result or an error, never both
// and never a panic; a request naming no container is NotFound; a failed request leaves no reservation, exec
// entry or file descriptor behind; containers only leave, and move only as the lifecycle table allows.
//
// CreateContainer for a new id would create a real container on this host: for those the fuzzer checks what
// prepareCreate, the handler's whole validation, makes of the request (the root stays inside the shared
// directory, the network namespace is the pod's, no hook survives) and stops there.
func FuzzContainersRequests(f *testing.F) {
	for _, seed := range containerSeeds(f) {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		s := fuzzService(t)
		warm, other, err := os.Pipe() // the runtime's poller opens its descriptors on first use
		if err != nil {
			t.Fatal(err)
		}
		warm.Close()
		other.Close()
		ctx, cancel := context.WithCancel(context.Background())
		cancel() // nothing may wait: the fake containers never exit
		for len(data) >= 3 {
			m := fuzzMethods[int(data[0])%len(fuzzMethods)]
			n := min(int(binary.LittleEndian.Uint16(data[1:])), len(data)-3)
			msg := data[3 : 3+n]
			data = data[3+n:]
			req := m.req()
			if proto.Unmarshal(msg, req) != nil {
				continue // ttrpc answers the decoding error; no handler runs
			}
			callHandler(t, ctx, s, m, req)
		}
	})
}

// callHandler makes one request and checks what it did.
func callHandler(t *testing.T, ctx context.Context, s *Service, m fuzzMethod, req proto.Message) {
	t.Helper()
	id := req.(interface{ GetContainerId() string }).GetContainerId()
	before := snapshotService(s)
	if m.name == "CreateContainer" {
		cr, err := s.prepareCreate(req.(*agentv1.CreateContainerRequest))
		if err == nil {
			checkCreation(t, s, cr)
			if _, held := before.states[id]; !held {
				return // a new container would be created for real
			}
		}
	}
	fds := openFDs(t)
	resp, err := m.call(ctx, s, req)
	if got := openFDs(t); got != fds {
		t.Fatalf("%s %v: %d file descriptors open before, %d after", m.name, req, fds, got)
	}
	if (err == nil) == (resp == nil || reflect.ValueOf(resp).IsNil()) {
		t.Fatalf("%s %v = %v, %v: want a result or an error", m.name, req, resp, err)
	}
	if err != nil && err.Error() == "" {
		t.Fatalf("%s %v: empty error", m.name, req)
	}
	if _, held := before.states[id]; !held && status.Code(err) != codes.NotFound && m.name != "CreateContainer" {
		t.Fatalf("%s for unknown container %q: %v, want NotFound", m.name, id, err)
	}
	after := snapshotService(s)
	if len(s.creating) != 0 {
		t.Fatalf("%s %v left reservations %v", m.name, req, s.creating)
	}
	for cid, st := range after.states {
		old, ok := before.states[cid]
		if !ok {
			t.Fatalf("%s %v added container %q", m.name, req, cid)
		}
		if st != old && !slices.Contains(lifecycle.Init()[old], st) {
			t.Fatalf("%s %v moved container %q from %s to %s", m.name, req, cid, old, st)
		}
		for _, e := range after.execs[cid] {
			if !slices.Contains(before.execs[cid], e) {
				t.Fatalf("%s %v left exec %q in container %q", m.name, req, e, cid)
			}
		}
	}
}

type serviceSnapshot struct {
	states map[string]lifecycle.State
	execs  map[string][]string
}

func snapshotService(s *Service) serviceSnapshot {
	snap := serviceSnapshot{states: map[string]lifecycle.State{}, execs: map[string][]string{}}
	s.mu.Lock()
	defer s.mu.Unlock()
	for id, c := range s.containers {
		c.mu.Lock()
		snap.states[id] = c.init.sm.State()
		for e := range c.execs {
			snap.execs[id] = append(snap.execs[id], e)
		}
		c.mu.Unlock()
	}
	return snap
}

func openFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// checkCreation fails t unless the container prepareCreate describes stays inside the shared directory, joins
// the pod's network namespace and no other network namespace, and keeps none of the host's hooks.
func checkCreation(t *testing.T, s *Service, cr *creation) {
	t.Helper()
	if !strings.HasPrefix(cr.root, s.cfg.SharedDir+string(filepath.Separator)) || cr.config.Rootfs != cr.root {
		t.Fatalf("container %q gets root %q (config %q), outside %s", cr.id, cr.root, cr.config.Rootfs, s.cfg.SharedDir)
	}
	podNet, _ := s.cfg.PodNetNS.Path()
	nets := 0
	for _, ns := range cr.config.Namespaces {
		if ns.Type == configs.NEWNET {
			nets++
			if ns.Path != podNet {
				t.Fatalf("container %q joins network namespace %q, not the pod's", cr.id, ns.Path)
			}
		}
	}
	if nets != 1 {
		t.Fatalf("container %q has %d network namespaces", cr.id, nets)
	}
	if len(cr.config.Hooks) != 0 {
		t.Fatalf("container %q keeps hooks %v", cr.id, cr.config.Hooks)
	}
	if !cr.lp.Init {
		t.Fatalf("container %q's process is not its init", cr.id)
	}
}

// containerSeeds are request sequences that reach every handler's checks.
func containerSeeds(f *testing.F) [][]byte {
	idx := map[string]byte{}
	for i, m := range fuzzMethods {
		idx[m.name] = byte(i)
	}
	enc := func(name string, req proto.Message) []byte {
		b, err := proto.Marshal(req)
		if err != nil {
			f.Fatalf("seed %s: %v", name, err)
		}
		return append(binary.LittleEndian.AppendUint16([]byte{idx[name]}, uint16(len(b))), b...)
	}
	js := func(v any) []byte {
		b, err := json.Marshal(v)
		if err != nil {
			f.Fatal(err)
		}
		return b
	}
	spec := js(specs.Spec{Version: "1.2.0", Process: &specs.Process{Args: []string{"sh"}, Cwd: "/",
		User: specs.User{Username: "user"}, Rlimits: []specs.POSIXRlimit{{Type: "RLIMIT_NOFILE", Hard: 8, Soft: 8}}},
		Root: &specs.Root{Path: "/host/path"}, Hooks: &specs.Hooks{}, Linux: &specs.Linux{
			Namespaces: []specs.LinuxNamespace{{Type: specs.PIDNamespace}, {Type: specs.NetworkNamespace, Path: "/var/run/netns/x"}}}})
	badNS := js(specs.Spec{Process: &specs.Process{Args: []string{"sh"}, Cwd: "/"}, Linux: &specs.Linux{
		Namespaces: []specs.LinuxNamespace{{Type: specs.PIDNamespace, Path: "/proc/1/ns/pid"}}}})
	exec := js(specs.Process{Args: []string{"ls"}, Cwd: "/", User: specs.User{UID: 5, AdditionalGids: []uint32{7}},
		Terminal: true})
	limit, weight := int64(1<<20), uint16(10)
	resources := js(specs.LinuxResources{Memory: &specs.LinuxMemory{Limit: &limit}, BlockIO: &specs.LinuxBlockIO{Weight: &weight},
		HugepageLimits: []specs.LinuxHugepageLimit{{Pagesize: "2MB", Limit: 1}}, Unified: map[string]string{"a": "b"}})
	cat := func(parts ...[]byte) []byte {
		var b []byte
		for _, p := range parts {
			b = append(b, p...)
		}
		return b
	}
	return [][]byte{
		cat(enc("CreateContainer", &agentv1.CreateContainerRequest{ContainerId: "new", Rootfs: "c/rootfs", OciSpec: spec}),
			enc("CreateContainer", &agentv1.CreateContainerRequest{ContainerId: "running", Rootfs: "c/rootfs", OciSpec: spec}),
			enc("CreateContainer", &agentv1.CreateContainerRequest{ContainerId: "x", Rootfs: "../etc", OciSpec: spec}),
			enc("CreateContainer", &agentv1.CreateContainerRequest{ContainerId: "y", Rootfs: "c/rootfs", OciSpec: badNS}),
			enc("CreateContainer", &agentv1.CreateContainerRequest{ContainerId: "z", Rootfs: "c/rootfs", OciSpec: []byte("{")})),
		cat(enc("ExecProcess", &agentv1.ExecProcessRequest{ContainerId: "running", ExecId: "e3", Process: exec,
			Stdio: &agentv1.Stdio{Terminal: true}}),
			enc("ExecProcess", &agentv1.ExecProcessRequest{ContainerId: "running", ExecId: "e1", Process: exec}),
			enc("ExecProcess", &agentv1.ExecProcessRequest{ContainerId: "running", ExecId: "e2", Process: exec,
				Stdio: &agentv1.Stdio{StdioKey: "k", Stdout: true}}),
			enc("ExecProcess", &agentv1.ExecProcessRequest{ContainerId: "created", ExecId: "e4", Process: exec}),
			enc("ExecProcess", &agentv1.ExecProcessRequest{ContainerId: "running", ExecId: "e5", Process: []byte("[]")})),
		cat(enc("StartContainer", &agentv1.StartContainerRequest{ContainerId: "created"}),
			enc("StartContainer", &agentv1.StartContainerRequest{ContainerId: "created"}),
			enc("PauseContainer", &agentv1.PauseContainerRequest{ContainerId: "created"}),
			enc("ResumeContainer", &agentv1.ResumeContainerRequest{ContainerId: "paused"}),
			enc("PauseContainer", &agentv1.PauseContainerRequest{ContainerId: "stopped"}),
			enc("SignalProcess", &agentv1.SignalProcessRequest{ContainerId: "running", Signal: 9, All: true}),
			enc("SignalProcess", &agentv1.SignalProcessRequest{ContainerId: "running", ExecId: "e1", Signal: 15}),
			enc("SignalProcess", &agentv1.SignalProcessRequest{ContainerId: "running", ExecId: "e2", Signal: 15}),
			enc("SignalProcess", &agentv1.SignalProcessRequest{ContainerId: "created", Signal: 1})),
		cat(enc("WaitProcess", &agentv1.WaitProcessRequest{ContainerId: "stopped"}),
			enc("WaitProcess", &agentv1.WaitProcessRequest{ContainerId: "running", ExecId: "e1"}),
			enc("CloseStdin", &agentv1.CloseStdinRequest{ContainerId: "running", ExecId: "e1"}),
			enc("ResizeTTY", &agentv1.ResizeTTYRequest{ContainerId: "running", Width: 80, Height: 24}),
			enc("UpdateContainer", &agentv1.UpdateContainerRequest{ContainerId: "running", Resources: resources}),
			enc("UpdateContainer", &agentv1.UpdateContainerRequest{ContainerId: "running", Resources: []byte("null")}),
			enc("StatsContainer", &agentv1.StatsContainerRequest{ContainerId: "running"}),
			enc("ListProcesses", &agentv1.ListProcessesRequest{ContainerId: "running"})),
		cat(enc("RemoveContainer", &agentv1.RemoveContainerRequest{ContainerId: "running"}),
			enc("RemoveContainer", &agentv1.RemoveContainerRequest{ContainerId: "running", Force: true}),
			enc("RemoveContainer", &agentv1.RemoveContainerRequest{ContainerId: "stopped"}),
			enc("StatsContainer", &agentv1.StatsContainerRequest{ContainerId: "stopped"}),
			enc("RemoveContainer", &agentv1.RemoveContainerRequest{ContainerId: "created"}),
			enc("ListProcesses", &agentv1.ListProcessesRequest{ContainerId: "nobody"})),
	}
}
