package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
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

// fakeContainers answers ListProcesses; any other method would panic.
type fakeContainers struct {
	agentv1.ContainersService
	calls chan struct{}
}

func (f fakeContainers) ListProcesses(context.Context, *agentv1.ListProcessesRequest) (*agentv1.ListProcessesResponse, error) {
	f.calls <- struct{}{}
	return &agentv1.ListProcessesResponse{}, nil
}

// pendingGuest is a Guest whose background setup the test finishes.
func pendingGuest() *Guest {
	return newGuest(logrus.NewEntry(logrus.New()), false)
}

func (g *Guest) finish(err error) {
	g.err = err
	close(g.done)
}

func proceeded(g *Guest) bool {
	select {
	case <-g.proceed:
		return true
	default:
		return false
	}
}

// serveGated serves the API with a Containers service gated on g.
func serveGated(t *testing.T, g *Guest, ctrs agentv1.ContainersService) *ttrpc.Client {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	log := logrus.New()
	log.SetOutput(io.Discard)
	srv, err := NewServer(logrus.NewEntry(log), ServerConfig{
		Version: "v-test", Root: "testdata/guest", Containers: ctrs, Ready: g.Ready, Answered: g.Proceed,
	})
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(t.TempDir(), "agent.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = srv.Serve(ctx, l) }()
	conn, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	c := ttrpc.NewClient(conn)
	t.Cleanup(func() { c.Close() })
	return c
}

// The host's first request lets the setup start; it need not wait for it.
func TestFirstRequestStartsSetup(t *testing.T) {
	g := pendingGuest()
	c := serveGated(t, g, fakeContainers{calls: make(chan struct{}, 1)})
	if proceeded(g) {
		t.Fatal("setup started before any request")
	}
	if _, err := agentv1.NewHealthClient(c).Check(context.Background(), &agentv1.CheckRequest{}); err != nil {
		t.Fatalf("health check before the guest is ready: %v", err)
	}
	if !proceeded(g) {
		t.Error("setup not started after the first request")
	}
}

func TestContainersRequestWaitsForSetup(t *testing.T) {
	g := pendingGuest()
	ctrs := fakeContainers{calls: make(chan struct{}, 1)}
	c := serveGated(t, g, ctrs)
	answered := make(chan error, 1)
	go func() {
		_, err := agentv1.NewContainersClient(c).ListProcesses(context.Background(), &agentv1.ListProcessesRequest{})
		answered <- err
	}()
	select {
	case <-ctrs.calls:
		t.Fatal("containers service called before the guest was ready")
	case <-time.After(100 * time.Millisecond):
	}
	if !proceeded(g) {
		t.Error("a waiting containers request did not start the setup")
	}
	g.finish(nil)
	if err := <-answered; err != nil {
		t.Fatalf("ListProcesses after setup: %v", err)
	}
}

func TestContainersRequestAfterFailedSetup(t *testing.T) {
	g := pendingGuest()
	g.finish(errors.New("mount virtiofs kiln-shared on /run/kiln/shared: no such device"))
	c := serveGated(t, g, fakeContainers{calls: make(chan struct{}, 1)})
	_, err := agentv1.NewContainersClient(c).ListProcesses(context.Background(), &agentv1.ListProcessesRequest{})
	if status.Code(err) != codes.Unavailable || !strings.Contains(fmt.Sprint(err), "mount virtiofs kiln-shared") {
		t.Fatalf("error = %v, want Unavailable naming the setup failure", err)
	}
}

func TestReadyHonoursContext(t *testing.T) {
	g := pendingGuest()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Millisecond)
	defer cancel()
	if err := g.Ready(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Ready = %v, want deadline exceeded", err)
	}
	g.Proceed() // once more: must not panic
}
