package stdio

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"io"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// fakeGuest accepts stream connections on a Unix socket the way the agent's stdio port does: it reads the
// preamble and hands the connection, by stream name, to the test.
type fakeGuest struct {
	path  string
	l     net.Listener
	mu    sync.Mutex
	conns map[string]*net.UnixConn
	keys  map[string]string
	got   chan string
}

func newFakeGuest(t *testing.T) *fakeGuest {
	t.Helper()
	g := &fakeGuest{path: filepath.Join(t.TempDir(), "g.sock"), conns: map[string]*net.UnixConn{},
		keys: map[string]string{}, got: make(chan string, 8)}
	l, err := net.Listen("unix", g.path)
	if err != nil {
		t.Fatal(err)
	}
	g.l = l
	t.Cleanup(func() { _ = l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go g.serve(c.(*net.UnixConn))
		}
	}()
	return g
}

func (g *fakeGuest) serve(c *net.UnixConn) {
	// One byte at a time, so no stream byte after the line is swallowed.
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
	g.mu.Lock()
	g.conns[stream], g.keys[stream] = c, key
	g.mu.Unlock()
	g.got <- stream
}

func (g *fakeGuest) DialVsock(ctx context.Context, port uint32) (net.Conn, error) {
	if port != Port {
		return nil, errors.New("wrong port")
	}
	var d net.Dialer
	return d.DialContext(ctx, "unix", g.path)
}

// wait returns the connections of the n streams the host opened.
func (g *fakeGuest) wait(t *testing.T, n int) map[string]*net.UnixConn {
	t.Helper()
	for range n {
		select {
		case <-g.got:
		case <-time.After(5 * time.Second):
			t.Fatal("streams did not arrive")
		}
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.conns
}

func TestOpenOnlyRequestedStreams(t *testing.T) {
	cases := []struct {
		name string
		io   IO
		want []string
	}{
		{"all three", IO{Stdin: strings.NewReader(""), Stdout: io.Discard, Stderr: io.Discard}, []string{"stdin", "stdout", "stderr"}},
		{"output only", IO{Stdout: io.Discard}, []string{"stdout"}},
		{"terminal", IO{Terminal: true, Stdin: strings.NewReader(""), Stdout: io.Discard, Stderr: io.Discard}, []string{"tty"}},
		{"none", IO{}, nil},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			g := newFakeGuest(t)
			s, err := Open(context.Background(), g, tc.io)
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			conns := g.wait(t, len(tc.want))
			for _, w := range tc.want {
				if conns[w] == nil {
					t.Errorf("stream %s not opened", w)
				}
				if g.keys[w] != s.Key() {
					t.Errorf("stream %s key %q, want %q", w, g.keys[w], s.Key())
				}
			}
			if len(conns) != len(tc.want) {
				t.Errorf("opened %d streams, want %d", len(conns), len(tc.want))
			}
			p := s.Proto()
			if p.GetStdioKey() != s.Key() || p.GetTerminal() != tc.io.Terminal {
				t.Errorf("proto %v does not match", p)
			}
			if !tc.io.Terminal && (p.GetStdin() != (tc.io.Stdin != nil) || p.GetStdout() != (tc.io.Stdout != nil) || p.GetStderr() != (tc.io.Stderr != nil)) {
				t.Errorf("proto %v does not match io", p)
			}
		})
	}
}

// The regression this pins: Wait must not return before the last byte the guest sent is in the writer.
func TestRelayDeliversEverythingBeforeWait(t *testing.T) {
	g := newFakeGuest(t)
	in := make([]byte, 3<<20)
	_, _ = rand.Read(in)
	var out, errOut bytes.Buffer
	s, err := Open(context.Background(), g, IO{Stdin: bytes.NewReader(in), Stdout: &out, Stderr: &errOut})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	conns := g.wait(t, 3)
	s.Start()
	// The guest echoes stdin to stdout until EOF (which the host sends by half-closing), then says bye on stderr.
	go func() {
		_, _ = io.Copy(conns["stdout"], conns["stdin"])
		_, _ = conns["stderr"].Write([]byte("bye\n"))
		_ = conns["stdout"].CloseWrite()
		_ = conns["stderr"].CloseWrite()
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := s.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(out.Bytes(), in) {
		t.Errorf("stdout: got %d bytes, want the %d sent", out.Len(), len(in))
	}
	if errOut.String() != "bye\n" {
		t.Errorf("stderr %q", errOut.String())
	}
	if err := s.Err(); err != nil {
		t.Errorf("relay errors: %v", err)
	}
}

type failingWriter struct{}

func (failingWriter) Write([]byte) (int, error) { return 0, errors.New("disk full") }

// A writer that fails must not stall the guest: the stream is still read to its end.
func TestFailingWriterStillDrains(t *testing.T) {
	g := newFakeGuest(t)
	s, err := Open(context.Background(), g, IO{Stdout: failingWriter{}})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	conns := g.wait(t, 1)
	s.Start()
	done := make(chan error, 1)
	go func() {
		_, err := conns["stdout"].Write(make([]byte, 4<<20))
		_ = conns["stdout"].CloseWrite()
		done <- err
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := s.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Errorf("guest write: %v", err)
	}
	if err := s.Err(); err == nil || !strings.Contains(err.Error(), "disk full") {
		t.Errorf("Err() = %v, want the writer's error", err)
	}
}

func TestTerminalCarriesInputAndOutput(t *testing.T) {
	g := newFakeGuest(t)
	pr, pw := io.Pipe()
	var out bytes.Buffer
	s, err := Open(context.Background(), g, IO{Terminal: true, Stdin: pr, Stdout: &out})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	conns := g.wait(t, 1)
	s.Start()
	go func() { _, _ = pw.Write([]byte("hello\n")) }()
	line, err := bufio.NewReader(conns["tty"]).ReadString('\n')
	if err != nil || line != "hello\n" {
		t.Fatalf("guest read %q, %v", line, err)
	}
	_, _ = conns["tty"].Write([]byte("HELLO\r\n"))
	_ = conns["tty"].CloseWrite()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := s.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	if out.String() != "HELLO\r\n" {
		t.Errorf("output %q", out.String())
	}
	_ = pw.Close()
}

func TestWaitHonoursContext(t *testing.T) {
	g := newFakeGuest(t)
	s, err := Open(context.Background(), g, IO{Stdout: io.Discard})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	g.wait(t, 1)
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if err := s.Wait(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Wait = %v, want deadline exceeded while the guest keeps the stream open", err)
	}
}

func TestOpenFailureClosesWhatWasOpened(t *testing.T) {
	g := newFakeGuest(t)
	_ = g.l.Close()
	if _, err := Open(context.Background(), g, IO{Stdout: io.Discard, Stderr: io.Discard}); err == nil {
		t.Fatal("Open succeeded with the guest gone")
	}
}

func TestPreamble(t *testing.T) {
	if got := Preamble("k1", StreamStderr); got != "k1 stderr\n" {
		t.Errorf("Preamble = %q", got)
	}
}

// stuckGuest accepts each stream and never reads it, as a guest granting no vsock credit does.
type stuckGuest struct{ peers chan net.Conn }

func (g stuckGuest) DialVsock(context.Context, uint32) (net.Conn, error) {
	host, guest := net.Pipe()
	g.peers <- guest
	return host, nil
}

// A guest that takes a stream and never reads its preamble fails Open when the caller's context ends, instead of
// holding it.
func TestOpenWithAGuestThatReadsNothing(t *testing.T) {
	g := stuckGuest{peers: make(chan net.Conn, 8)}
	defer func() {
		close(g.peers)
		for c := range g.peers {
			c.Close()
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	done := make(chan error, 1)
	go func() {
		_, err := Open(ctx, g, IO{Stdout: io.Discard})
		done <- err
	}()
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("Open succeeded though the guest read no preamble")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Open still waits 10 s after its 200 ms context ended")
	}
}
