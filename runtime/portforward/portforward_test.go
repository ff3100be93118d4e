package portforward

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/sirupsen/logrus"

	agentnet "github.com/kiln-runtime/kiln/agent/network"
	agentpf "github.com/kiln-runtime/kiln/agent/portforward"
	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
)

// unixDialer stands in for vsock: the agent's server listens on a Unix socket instead of a vsock port.
type unixDialer string

func (d unixDialer) DialVsock(ctx context.Context, port uint32) (net.Conn, error) {
	if port != Port {
		return nil, fmt.Errorf("dial port %d, want %d", port, Port)
	}
	var nd net.Dialer
	return nd.DialContext(ctx, "unix", string(d))
}

// Everything but the VM: a client in the "host" namespace dials localhost:<port> as containerd does, the
// forwarder steers it to the agent's real server, which dials the port in the "guest" pod namespace through
// agent/network, where an HTTP server answers.
func TestForwardReachesThePodNamespace(t *testing.T) {
	hostNS := newNetns(t, true)
	log := logrus.NewEntry(logrus.StandardLogger())

	pod := agentnet.New(filepath.Join(t.TempDir(), "pod"), log)
	guestNS, err := pod.Path()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = syscall.Unmount(guestNS, syscall.MNT_DETACH) })
	web, err := listenInNS(guestNS, "tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprint(w, "hello from the pod")
	})}
	go func() { _ = srv.Serve(web) }()
	t.Cleanup(func() { srv.Close() })
	port := web.Addr().(*net.TCPAddr).Port

	sock := filepath.Join(t.TempDir(), "vsock")
	vl, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	agentSrv := agentpf.NewServer(log, pod, agentpf.Config{})
	served := make(chan error, 1)
	go func() { served <- agentSrv.Serve(ctx, vl) }()
	t.Cleanup(func() {
		cancel()
		if err := <-served; err != nil {
			t.Error(err)
		}
	})

	f, err := Start(hostNS, unixDialer(sock), log)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()

	// HTTP/1.0 over the connection: the client half-closes after its request and reads the answer to its end,
	// which needs the half-close to cross both relays.
	c, err := dialIn(hostNS, "tcp4", fmt.Sprintf("localhost:%d", port))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := io.WriteString(c, "GET / HTTP/1.0\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	if err := c.(*net.TCPConn).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatal(err)
	}
	body, err := io.ReadAll(resp.Body)
	if err != nil || string(body) != "hello from the pod" {
		t.Errorf("through the forward: %q, %v", body, err)
	}

	// A port nothing listens on in the pod: the agent says so and the client's connection is reset.
	dead, err := listenInNS(guestNS, "tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	deadPort := dead.Addr().(*net.TCPAddr).Port
	dead.Close()
	if !dialReset(t, hostNS, fmt.Sprintf("127.0.0.1:%d", deadPort)) {
		t.Error("a forward to a closed port was not reset")
	}
	if n := f.Failed(); n != 1 {
		t.Errorf("Failed() = %d, want 1", n)
	}
}

// dialReset dials addr in the namespace at path and reports whether the connection was reset: the reset may come
// before the dial has seen the connection established, or after, on the first read.
func dialReset(t *testing.T, path, addr string) bool {
	t.Helper()
	c, err := dialIn(path, "tcp4", addr)
	if errors.Is(err, syscall.ECONNRESET) {
		return true
	}
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_, err = c.Read(make([]byte, 1))
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Logf("read from %s: %v, want a reset", addr, err)
		return false
	}
	return true
}

// guestFunc is a fake guest for the error paths: each dial hands fn the guest's end of a pipe.
type guestFunc func(ctx context.Context, c net.Conn)

func (g guestFunc) DialVsock(ctx context.Context, port uint32) (net.Conn, error) {
	host, guest := net.Pipe()
	go g(ctx, guest)
	return host, nil
}

// A guest that answers badly or without end gets the client's connection reset, and the host reads no more of
// its answer than the bound.
func TestForwardBoundsTheGuestsReply(t *testing.T) {
	for _, tc := range []struct {
		name  string
		reply string
	}{
		{"error line", "error connection refused\n"},
		{"no newline", strings.Repeat("x", 1<<20)},
		{"unknown word", "maybe\n"},
		{"closed at once", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := newNetns(t, true)
			written := make(chan int, 1)
			f, err := Start(path, guestFunc(func(ctx context.Context, c net.Conn) {
				defer c.Close()
				if port, err := agentv1.ReadPortForwardRequest(c); err != nil || port != 4242 {
					t.Errorf("request: port %d, %v", port, err)
				}
				n, _ := io.WriteString(c, tc.reply)
				written <- n
			}), logrus.NewEntry(logrus.StandardLogger()))
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			if !dialReset(t, path, "127.0.0.1:4242") {
				t.Error("the client's connection was not reset")
			}
			if n := <-written; n > agentv1.MaxPortForwardReply {
				t.Errorf("host read %d bytes of the reply, bound %d", n, agentv1.MaxPortForwardReply)
			}
			if n := f.Failed(); n != 1 {
				t.Errorf("Failed() = %d, want 1", n)
			}
		})
	}
}

// Beyond MaxConns streams at once a connection is reset and counted; Close cuts the streams under way (here
// guests that never answer) and returns.
func TestForwardLimitsConnections(t *testing.T) {
	path := newNetns(t, true)
	f, err := Start(path, guestFunc(func(ctx context.Context, c net.Conn) {
		// Read the request and never answer; the host closes the pipe when it gives up.
		_, _ = io.Copy(io.Discard, c)
	}), logrus.NewEntry(logrus.StandardLogger()))
	if err != nil {
		t.Fatal(err)
	}
	var conns []net.Conn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for i := 0; i < MaxConns; i++ {
		c, err := dialIn(path, "tcp4", "127.0.0.1:8080")
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
	}
	// Connections are accepted in order: the next is the one over the limit.
	if !dialReset(t, path, "127.0.0.1:8080") {
		t.Errorf("connection %d was not reset", MaxConns+1)
	}
	if n := f.Refused(); n != 1 {
		t.Errorf("Refused() = %d, want 1", n)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	// Closing cut the waiting ones too.
	if _, err := conns[0].Read(make([]byte, 1)); err == nil {
		t.Error("a waiting connection survived Close")
	}
}
