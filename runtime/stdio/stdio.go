// Package stdio owns the host end of a guest process's standard streams: it opens one vsock connection to the
// agent's stdio port per stream (or one for a terminal), introduces each with the protocol's preamble line, and
// relays bytes between those connections and the caller's readers and writers. It guarantees that everything the
// guest sent has reached the caller's writers before Wait returns, which is what lets a caller deliver all output
// before an exit status. It knows the stdio protocol of proto/agent/v1/container.proto and nothing of the agent's
// RPCs, of containers, or of containerd.
package stdio

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"syscall"
	"time"

	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
)

// Port is the guest agent's vsock port for stdio streams.
const Port = agentv1.StdioPort

// Stream names as the preamble spells them.
const (
	StreamStdin  = "stdin"
	StreamStdout = "stdout"
	StreamStderr = "stderr"
	StreamTTY    = "tty"
)

// Dialer opens a byte stream to a guest vsock port; vm.Machine is one.
type Dialer interface {
	DialVsock(ctx context.Context, port uint32) (net.Conn, error)
}

// IO is what a caller attaches to a process. A nil member means the process does not get that stream (the
// agent gives it /dev/null instead).
type IO struct {
	Stdin  io.Reader
	Stdout io.Writer
	Stderr io.Writer
	// Terminal runs the process on a pseudo-terminal: one stream carries Stdin in and the terminal's output to
	// Stdout; Stderr is not used.
	Terminal bool
}

// halfCloser is a connection whose sending side can be shut alone: the peer reads EOF and can still send.
type halfCloser interface {
	CloseWrite() error
}

// Streams are the open connections of one process. Create them with Open before the agent request that names
// their key, and call Start once the agent has accepted that request.
type Streams struct {
	key string
	io  IO

	stdin, stdout, stderr, tty net.Conn

	startOnce  sync.Once
	stdinOnce  sync.Once
	closeOnce  sync.Once
	outputDone chan struct{}
	stdinDone  chan struct{}

	mu     sync.Mutex
	errs   []error
	copies sync.WaitGroup
}

// Open dials one connection per stream that io asks for and writes each one's preamble. Nothing is copied
// until Start. On error every connection opened so far is closed.
func Open(ctx context.Context, d Dialer, io IO) (*Streams, error) {
	key, err := newKey()
	if err != nil {
		return nil, err
	}
	s := &Streams{key: key, io: io, outputDone: make(chan struct{}), stdinDone: make(chan struct{})}
	type want struct {
		name string
		conn *net.Conn
	}
	var wants []want
	if io.Terminal {
		wants = append(wants, want{StreamTTY, &s.tty})
	} else {
		if io.Stdin != nil {
			wants = append(wants, want{StreamStdin, &s.stdin})
		}
		if io.Stdout != nil {
			wants = append(wants, want{StreamStdout, &s.stdout})
		}
		if io.Stderr != nil {
			wants = append(wants, want{StreamStderr, &s.stderr})
		}
	}
	// The dials are independent round trips to the guest; doing them together keeps exec latency down.
	errs := make([]error, len(wants))
	var wg sync.WaitGroup
	for i, w := range wants {
		wg.Go(func() {
			c, err := dial(ctx, d, key, w.name)
			*w.conn, errs[i] = c, err
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		s.closeConns()
		return nil, err
	}
	return s, nil
}

func dial(ctx context.Context, d Dialer, key, stream string) (net.Conn, error) {
	c, err := d.DialVsock(ctx, Port)
	if err != nil {
		return nil, fmt.Errorf("open %s stream %s: %w", stream, key, err)
	}
	// A guest that accepts the stream and grants it no credit would hold a kernel vsock socket's write (Kiln's
	// own device buffers the line in its Unix socket) beyond anything ctx bounds.
	deadline := time.Now().Add(preambleTimeout)
	if dl, ok := ctx.Deadline(); ok && dl.Before(deadline) {
		deadline = dl
	}
	_ = c.SetWriteDeadline(deadline)
	if _, err := io.WriteString(c, Preamble(key, stream)); err != nil {
		_ = c.Close()
		return nil, fmt.Errorf("write preamble of %s stream %s: %w", stream, key, err)
	}
	_ = c.SetWriteDeadline(time.Time{})
	return c, nil
}

// preambleTimeout bounds writing a stream's preamble: one short line to a guest that has just accepted it.
const preambleTimeout = 30 * time.Second

// Preamble is the line that introduces a stream connection to the agent.
func Preamble(key, stream string) string { return key + " " + stream + "\n" }

func newKey() (string, error) {
	b := make([]byte, 12)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("make stdio key: %w", err)
	}
	return hex.EncodeToString(b), nil
}

// Key is the stdio_key the streams were opened under.
func (s *Streams) Key() string { return s.key }

// Proto describes the streams for the agent request.
func (s *Streams) Proto() *agentv1.Stdio {
	if s.io.Terminal {
		return &agentv1.Stdio{StdioKey: s.key, Terminal: true, Stdin: s.io.Stdin != nil, Stdout: true}
	}
	return &agentv1.Stdio{StdioKey: s.key, Stdin: s.stdin != nil, Stdout: s.stdout != nil, Stderr: s.stderr != nil}
}

// Terminal reports whether the process runs on a pseudo-terminal.
func (s *Streams) Terminal() bool { return s.io.Terminal }

// HasStdin reports whether the process has its own stdin connection (not a terminal), which CloseStdin
// half-closes.
func (s *Streams) HasStdin() bool { return s.stdin != nil }

// Start begins relaying. A stdin reader that reaches EOF half-closes the stdin connection, so the process reads
// EOF after every byte that came before it. Output goes to the writers until the guest half-closes each stream.
func (s *Streams) Start() {
	s.startOnce.Do(func() {
		if s.tty != nil {
			s.copyOut(s.tty, s.io.Stdout, StreamTTY)
			if s.io.Stdin != nil {
				// EOF on a terminal's input is not end of stream: the terminal stays the process's, as with runc.
				go s.copyIn(s.tty, s.io.Stdin, false)
			} else {
				close(s.stdinDone)
			}
		} else {
			if s.stdout != nil {
				s.copyOut(s.stdout, s.io.Stdout, StreamStdout)
			}
			if s.stderr != nil {
				s.copyOut(s.stderr, s.io.Stderr, StreamStderr)
			}
			if s.stdin != nil {
				go s.copyIn(s.stdin, s.io.Stdin, true)
			} else {
				close(s.stdinDone)
			}
		}
		go func() {
			s.copies.Wait()
			close(s.outputDone)
		}()
	})
}

func (s *Streams) copyOut(c net.Conn, w io.Writer, name string) {
	s.copies.Add(1)
	go func() {
		defer s.copies.Done()
		if w == nil {
			w = io.Discard
		}
		_, err := io.Copy(w, c)
		if err != nil {
			// The caller's writer failed: keep reading so the guest is never blocked on a full stream.
			if _, derr := io.Copy(io.Discard, c); derr != nil && !errors.Is(derr, net.ErrClosed) {
				err = errors.Join(err, derr)
			}
			if !errors.Is(err, net.ErrClosed) {
				s.addErr(fmt.Errorf("relay %s of %s: %w", name, s.key, err))
			}
		}
	}()
}

func (s *Streams) copyIn(c net.Conn, r io.Reader, halfClose bool) {
	defer close(s.stdinDone)
	_, err := io.Copy(c, r)
	if err != nil && !errors.Is(err, net.ErrClosed) && !errors.Is(err, syscall.EPIPE) && !errors.Is(err, syscall.ECONNRESET) {
		// A process that exits without reading all its input closes the stream under us (EPIPE, ECONNRESET):
		// that is how input ends, not a failure.
		s.addErr(fmt.Errorf("relay stdin of %s: %w", s.key, err))
	}
	if halfClose {
		s.CloseStdin()
	}
}

func (s *Streams) addErr(err error) {
	s.mu.Lock()
	s.errs = append(s.errs, err)
	s.mu.Unlock()
}

// CloseStdin half-closes the stdin connection: the process reads EOF once it has read what was sent before.
// Without a stdin connection (no stdin, or a terminal) it does nothing.
func (s *Streams) CloseStdin() {
	if s.stdin == nil {
		return
	}
	s.stdinOnce.Do(func() {
		if hc, ok := s.stdin.(halfCloser); ok {
			_ = hc.CloseWrite()
			return
		}
		_ = s.stdin.Close()
	})
}

// StdinDone is closed when the caller's stdin has been relayed to its end (or there is none).
func (s *Streams) StdinDone() <-chan struct{} { return s.stdinDone }

// OutputDone is closed when every output stream has ended and its bytes are in the caller's writers.
func (s *Streams) OutputDone() <-chan struct{} { return s.outputDone }

// Wait blocks until all output has been relayed (the guest half-closed every output stream) or ctx ends.
func (s *Streams) Wait(ctx context.Context) error {
	s.Start()
	select {
	case <-s.outputDone:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("wait for output of %s: %w", s.key, ctx.Err())
	}
}

// Err returns the relay errors seen so far.
func (s *Streams) Err() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return errors.Join(s.errs...)
}

// Close closes every connection, which ends the relays. A stdin reader blocked in Read is not interrupted:
// its goroutine ends at the reader's next return.
func (s *Streams) Close() error {
	s.closeOnce.Do(s.closeConns)
	return nil
}

func (s *Streams) closeConns() {
	for _, c := range []net.Conn{s.stdin, s.stdout, s.stderr, s.tty} {
		if c != nil {
			_ = c.Close()
		}
	}
}
