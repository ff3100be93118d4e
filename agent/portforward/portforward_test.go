package portforward

import (
	"context"
	"errors"
	"io"
	"net"
	"strings"
	"testing"

	"github.com/sirupsen/logrus"

	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
)

// dialFunc is a fake pod network for the error paths.
type dialFunc func(ctx context.Context, port uint16) (net.Conn, error)

func (f dialFunc) DialLoopback(ctx context.Context, port uint16) (net.Conn, error) {
	return f(ctx, port)
}

func serve(t *testing.T, d Dialer, cfg Config) (*Server, string) {
	t.Helper()
	l, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := NewServer(logrus.NewEntry(logrus.StandardLogger()), d, cfg)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx, l) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	})
	return s, l.Addr().String()
}

// A port the pod cannot reach gets an error reply naming the dial's failure, then the end of the connection.
func TestServerRepliesWithTheDialError(t *testing.T) {
	_, addr := serve(t, dialFunc(func(ctx context.Context, port uint16) (net.Conn, error) {
		if port != 8080 {
			t.Errorf("dial port %d, want 8080", port)
		}
		return nil, errors.New("dial tcp 127.0.0.1:8080: connect: connection refused")
	}), Config{})
	c, err := net.Dial("tcp4", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := agentv1.WritePortForwardRequest(c, 8080); err != nil {
		t.Fatal(err)
	}
	err = agentv1.ReadPortForwardReply(c)
	if !errors.Is(err, agentv1.ErrPortForwardRefused) || !strings.Contains(err.Error(), "connection refused") {
		t.Errorf("reply: %v", err)
	}
	if b, err := io.ReadAll(c); err != nil || len(b) != 0 {
		t.Errorf("after the error reply: %q, %v; want the end", b, err)
	}
}

// A bad request is not dialled and gets no reply.
func TestServerRefusesABadRequest(t *testing.T) {
	_, addr := serve(t, dialFunc(func(ctx context.Context, port uint16) (net.Conn, error) {
		t.Errorf("dialled port %d for a bad request", port)
		return nil, errors.New("no")
	}), Config{})
	c, err := net.Dial("tcp4", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := io.WriteString(c, "http\n"); err != nil {
		t.Fatal(err)
	}
	if b, err := io.ReadAll(c); len(b) != 0 {
		t.Errorf("answer to a bad request: %q, %v", b, err)
	}
}

// Beyond MaxConns connections at once, one is closed unserved and counted.
func TestServerLimitsConnections(t *testing.T) {
	release := make(chan struct{})
	dialled := make(chan struct{}, 2)
	s, addr := serve(t, dialFunc(func(ctx context.Context, port uint16) (net.Conn, error) {
		dialled <- struct{}{}
		<-release
		return nil, errors.New("released")
	}), Config{MaxConns: 2})
	defer close(release)
	var conns []net.Conn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for i := 0; i < 2; i++ {
		c, err := net.Dial("tcp4", addr)
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
		if err := agentv1.WritePortForwardRequest(c, 80); err != nil {
			t.Fatal(err)
		}
		<-dialled
	}
	c, err := net.Dial("tcp4", addr)
	if err != nil {
		t.Fatal(err)
	}
	conns = append(conns, c)
	if b, err := io.ReadAll(c); len(b) != 0 || err != nil {
		t.Errorf("third connection: %q, %v; want it closed unserved", b, err)
	}
	if n := s.Refused(); n != 1 {
		t.Errorf("Refused() = %d, want 1", n)
	}
}
