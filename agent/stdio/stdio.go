// Package stdio is the guest end of process stdio: it accepts the host's
// stdio connections on vsock port 1025, reads each one's preamble line
// "<stdio_key> <stream>\n" and parks it under its key until a container
// request claims the streams it expects.
//
// It owns the preamble format and the parking rules (how long a connection
// waits to be claimed, how long a claim waits for its connections). It must
// not know about containers, processes or what the bytes mean.
package stdio

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/kiln-runtime/kiln/agent/accept"
	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
)

// Port is the vsock port the host opens stdio connections to.
const Port = agentv1.StdioPort

// SocketBuffer is the vsock socket buffer of stdio connections, and so the window of output a process may
// have in flight to the host (the host's vsock device offers as much). With Linux's default of 256 KiB a
// container's stdout under TCG moved about 15% less (docs/fast-start-log.md, session 28). It bounds the input
// waiting in the guest's kernel for a process that does not read its stdin, too.
const SocketBuffer = 1 << 20

// Stream names one stdio stream of a process.
type Stream string

// The streams a preamble may name.
const (
	Stdin  Stream = "stdin"
	Stdout Stream = "stdout"
	Stderr Stream = "stderr"
	// TTY is the one stream of a process with a terminal: output, and input
	// when the process reads stdin.
	TTY Stream = "tty"
)

// maxPreamble bounds the preamble line so that a peer that never sends a
// newline cannot make the agent buffer without end.
const maxPreamble = 256

// ParseStream turns a preamble's stream word into a Stream.
func ParseStream(s string) (Stream, error) {
	switch st := Stream(s); st {
	case Stdin, Stdout, Stderr, TTY:
		return st, nil
	}
	return "", fmt.Errorf("unknown stdio stream %q", s)
}

// ReadPreamble reads the preamble line from r one byte at a time: bytes after
// the newline belong to the stream (stdin data may follow at once), so none
// may be read ahead.
func ReadPreamble(r io.Reader) (key string, stream Stream, err error) {
	var line []byte
	var b [1]byte
	for {
		n, err := r.Read(b[:])
		if n == 1 {
			if b[0] == '\n' {
				break
			}
			line = append(line, b[0])
			if len(line) > maxPreamble {
				return "", "", fmt.Errorf("stdio preamble longer than %d bytes", maxPreamble)
			}
			continue
		}
		if errors.Is(err, io.EOF) {
			return "", "", fmt.Errorf("stdio preamble %q: %w", line, io.ErrUnexpectedEOF)
		}
		if err != nil {
			return "", "", fmt.Errorf("read stdio preamble: %w", err)
		}
	}
	fields := strings.Fields(string(bytes.TrimSuffix(line, []byte("\r"))))
	if len(fields) != 2 {
		return "", "", fmt.Errorf("stdio preamble %q: want \"<key> <stream>\"", line)
	}
	stream, err = ParseStream(fields[1])
	if err != nil {
		return "", "", fmt.Errorf("stdio preamble %q: %w", line, err)
	}
	return fields[0], stream, nil
}

// Config bounds the waits of a Hub; zero fields take the defaults.
type Config struct {
	// PreambleTimeout bounds the wait for a new connection's preamble.
	PreambleTimeout time.Duration
	// ParkTimeout is how long a connection waits to be claimed before it is
	// closed.
	ParkTimeout time.Duration
}

// Default waits of a Hub.
const (
	DefaultPreambleTimeout = 10 * time.Second
	DefaultParkTimeout     = 60 * time.Second
)

// Serve accepts stdio connections on l until ctx is done or l fails, parking
// each in h once its preamble is read. It closes l when ctx is done.
func Serve(ctx context.Context, log *logrus.Entry, l net.Listener, h *Hub) error {
	stop := context.AfterFunc(ctx, func() { l.Close() })
	defer stop()
	for {
		c, err := accept.Next(ctx, l)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("accept stdio connection on %s: %w", l.Addr(), err)
		}
		go func() {
			if err := h.Accept(c); err != nil {
				log.WithError(err).WithField("remote", c.RemoteAddr()).Warn("stdio connection refused")
			}
		}()
	}
}
