package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containerd/ttrpc"
	"github.com/sirupsen/logrus"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
)

type testAgent struct {
	health     agentv1.HealthService
	agent      agentv1.AgentService
	served     chan error
	server     *Server
	shutdowns  chan string
	clientConn *ttrpc.Client
	sock       string
}

// startAgent serves the API on a unix socket, as the agent does on vsock.
func startAgent(t *testing.T, allowShutdown bool) *testAgent {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	log := logrus.New()
	log.SetOutput(io.Discard)
	ta := &testAgent{served: make(chan error, 1), shutdowns: make(chan string, 4)}
	cfg := ServerConfig{Version: "v-test", Root: "testdata/guest", StartedAt: time.Now().Add(-time.Second)}
	if allowShutdown {
		cfg.OnShutdown = func(reason string) { ta.shutdowns <- reason }
	}
	srv, err := NewServer(logrus.NewEntry(log), cfg)
	if err != nil {
		t.Fatal(err)
	}
	ta.server = srv
	sock := filepath.Join(t.TempDir(), "agent.sock")
	ta.sock = sock
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	go func() { ta.served <- srv.Serve(ctx, l) }()
	conn, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	ta.clientConn = ttrpc.NewClient(conn)
	t.Cleanup(func() { ta.clientConn.Close() })
	ta.health = agentv1.NewHealthClient(ta.clientConn)
	ta.agent = agentv1.NewAgentClient(ta.clientConn)
	return ta
}

func TestHealthCheck(t *testing.T) {
	ta := startAgent(t, true)
	resp, err := ta.health.Check(context.Background(), &agentv1.CheckRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if resp.Status != agentv1.CheckResponse_SERVING || resp.AgentVersion != "v-test" {
		t.Errorf("Check = %v, want SERVING v-test", resp)
	}
}

func TestGuestInfoOverTTRPC(t *testing.T) {
	ta := startAgent(t, true)
	info, err := ta.agent.GuestInfo(context.Background(), &agentv1.GuestInfoRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if info.KernelRelease != "6.1.0-31-cloud-amd64" || info.AgentVersion != "v-test" || info.Vcpus != 2 {
		t.Errorf("GuestInfo = %v", info)
	}
	if info.AgentInit.AsDuration() < time.Second {
		t.Errorf("agent init = %v, want at least 1s", info.AgentInit.AsDuration())
	}
}

// Shutdown must be answered, tell the owner once, and make Health report
// NOT_SERVING so that a host polling health does not send more work.
func TestShutdownAnswersThenNotifiesOnce(t *testing.T) {
	ta := startAgent(t, true)
	ctx := context.Background()
	for range 2 {
		if _, err := ta.agent.Shutdown(ctx, &agentv1.ShutdownRequest{Reason: "test"}); err != nil {
			t.Fatal(err)
		}
	}
	if got := <-ta.shutdowns; got != "test" {
		t.Errorf("shutdown reason = %q, want test", got)
	}
	select {
	case r := <-ta.shutdowns:
		t.Errorf("second OnShutdown call (%q)", r)
	default:
	}
	resp, err := ta.health.Check(ctx, &agentv1.CheckRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if resp.Status != agentv1.CheckResponse_NOT_SERVING {
		t.Errorf("status after shutdown = %v, want NOT_SERVING", resp.Status)
	}
}

func TestShutdownRefusedWithoutOwner(t *testing.T) {
	ta := startAgent(t, false)
	if _, err := ta.agent.Shutdown(context.Background(), &agentv1.ShutdownRequest{}); err == nil {
		t.Fatal("Shutdown succeeded with no OnShutdown")
	}
}

func TestServerShutdownEndsServe(t *testing.T) {
	ta := startAgent(t, true)
	if _, err := ta.health.Check(context.Background(), &agentv1.CheckRequest{}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := ta.server.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-ta.served:
		if err != nil {
			t.Errorf("Serve after Shutdown = %v, want nil", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Serve did not return after Shutdown")
	}
}

// After a Shutdown request the agent waits for the host to hang up, not for a fixed time: WaitHungUp returns
// once the client's connection is closed, and not while it stays open.
func TestWaitHungUpFollowsTheHostsConnection(t *testing.T) {
	ta := startAgent(t, true)
	ctx := context.Background()
	if _, err := ta.agent.Shutdown(ctx, &agentv1.ShutdownRequest{Reason: "test"}); err != nil {
		t.Fatal(err)
	}
	short, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel()
	if err := ta.server.WaitHungUp(short); err == nil {
		t.Fatal("WaitHungUp returned while the host's connection was open")
	}
	// A second connection, already closed by the host, must not hold the wait up.
	other, err := net.Dial("unix", ta.sock)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := agentv1.NewHealthClient(ttrpc.NewClient(other)).Check(ctx, &agentv1.CheckRequest{}); err != nil {
		t.Fatal(err)
	}
	_ = other.Close()
	_ = ta.clientConn.Close()
	long, cancel2 := context.WithTimeout(ctx, 5*time.Second)
	defer cancel2()
	if err := ta.server.WaitHungUp(long); err != nil {
		t.Fatalf("WaitHungUp after the host hung up: %v", err)
	}
}

// A handler that panics fails its request with Internal; the agent, PID 1 of the guest, goes on.
func TestHandlerPanicFailsTheRequest(t *testing.T) {
	s, err := NewServer(logrus.NewEntry(logrus.New()), ServerConfig{})
	if err != nil {
		t.Fatal(err)
	}
	info := &ttrpc.UnaryServerInfo{FullMethod: "/kiln.agent.v1.Containers/PidsContainer"}
	_, err = s.logCall(context.Background(), func(any) error { return nil }, info, func(context.Context, func(any) error) (any, error) {
		var m map[string]int
		m["boom"]++ // a nil map: panics
		return nil, nil
	})
	if status.Code(err) != codes.Internal || !strings.Contains(err.Error(), "PidsContainer") {
		t.Errorf("a panicking handler: %v, want Internal naming the method", err)
	}
}

type fakeAdder struct{ err error }

func (f fakeAdder) Add(mib uint64) (uint64, uint64, error) { return 0, 0, f.err }

type fakeCPUAdder struct{ err error }

func (f fakeCPUAdder) Add(n int) (int, error) { return 0, f.err }

// AddMemory and AddVCPUs tell the host which of their failures are the VM's limits (ResourceExhausted) and which
// are a guest kernel that cannot add anything (Unimplemented): only the latter is answered by configuring VMs that
// do not grow.
func TestAddCodes(t *testing.T) {
	for _, tc := range []struct {
		name string
		err  error
		want codes.Code
	}{
		{"added", nil, codes.OK},
		{"no more", ErrNoRAM, codes.ResourceExhausted},
		{"no hot-plug", fmt.Errorf("add: %w: %w", ErrNoHotplug, fs.ErrNotExist), codes.Unimplemented},
		{"another failure", errors.New("write threads-max: invalid argument"), codes.Internal},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cpuErr := tc.err
			if errors.Is(cpuErr, ErrNoRAM) {
				cpuErr = ErrNoCPU
			}
			srv := &Server{}
			srv.cfg.Memory, srv.cfg.CPUs = fakeAdder{tc.err}, fakeCPUAdder{cpuErr}
			_, err := agentService{srv}.AddMemory(context.Background(), &agentv1.AddMemoryRequest{MemoryMib: 512})
			if got := status.Code(err); got != tc.want {
				t.Errorf("AddMemory: %v (code %s), want code %s", err, got, tc.want)
			}
			_, err = agentService{srv}.AddVCPUs(context.Background(), &agentv1.AddVCPUsRequest{Vcpus: 2})
			if got := status.Code(err); got != tc.want {
				t.Errorf("AddVCPUs: %v (code %s), want code %s", err, got, tc.want)
			}
		})
	}
}
