package agentv1

import (
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// A port-forward connection (vsock PortForwardPort) carries one forwarded TCP stream. The host opens it and writes
// a request line, "<port>\n" with the port in decimal (1 to 65535). The agent dials that port on the loopback of
// the pod's network namespace (127.0.0.1, then ::1) and answers one line: "ok\n", after which the connection
// carries the stream's bytes both ways, or "error <reason>\n", after which it closes. Either side that reads the
// end of its own stream half-closes the other (CloseWrite), and closes once both directions have ended, or a grace
// after the first did (HalfCloseGrace).
//
// Both lines are read one byte at a time: the stream's bytes follow them at once, so nothing may be read ahead.

// Bounds of the two lines, newline included: a peer that never sends a newline cannot make the other buffer without
// end.
const (
	maxPortForwardRequest = len("65535\n")
	// MaxPortForwardReply bounds the agent's answer.
	MaxPortForwardReply = 256
)

const (
	portForwardOK    = "ok"
	portForwardError = "error "
)

// WritePortForwardRequest writes the host's request for port.
func WritePortForwardRequest(w io.Writer, port uint16) error {
	if port == 0 {
		return errors.New("port-forward request: port 0")
	}
	if _, err := io.WriteString(w, strconv.Itoa(int(port))+"\n"); err != nil {
		return fmt.Errorf("write port-forward request for port %d: %w", port, err)
	}
	return nil
}

// ReadPortForwardRequest reads the host's request and returns the port it names.
func ReadPortForwardRequest(r io.Reader) (uint16, error) {
	line, err := readLine(r, maxPortForwardRequest)
	if err != nil {
		return 0, fmt.Errorf("read port-forward request: %w", err)
	}
	// Only plain decimal digits: ParseUint would take no sign, but the check keeps "+80" and " 80" out too.
	if line == "" || strings.TrimLeft(line, "0123456789") != "" {
		return 0, fmt.Errorf("port-forward request %q: want a port number", line)
	}
	port, err := strconv.ParseUint(line, 10, 16)
	if err != nil || port == 0 {
		return 0, fmt.Errorf("port-forward request %q: want a port from 1 to 65535", line)
	}
	return uint16(port), nil
}

// WritePortForwardReply writes the agent's answer: "ok" when dialErr is nil, else dialErr's text on one line, cut
// to fit MaxPortForwardReply.
func WritePortForwardReply(w io.Writer, dialErr error) error {
	line := portForwardOK
	if dialErr != nil {
		reason := strings.Join(strings.Fields(dialErr.Error()), " ")
		if reason == "" {
			reason = "failed"
		}
		line = portForwardError + reason
		if max := MaxPortForwardReply - 1; len(line) > max {
			line = line[:max]
		}
	}
	if _, err := io.WriteString(w, line+"\n"); err != nil {
		return fmt.Errorf("write port-forward reply: %w", err)
	}
	return nil
}

// ErrPortForwardRefused is what ReadPortForwardReply returns, wrapped with the agent's reason, when the agent
// could not reach the port.
var ErrPortForwardRefused = errors.New("the guest could not reach the port")

// ReadPortForwardReply reads the agent's answer: nil for "ok", ErrPortForwardRefused with the agent's reason for an
// error line, another error for anything else.
func ReadPortForwardReply(r io.Reader) error {
	line, err := readLine(r, MaxPortForwardReply)
	if err != nil {
		return fmt.Errorf("read port-forward reply: %w", err)
	}
	if line == portForwardOK {
		return nil
	}
	if reason, ok := strings.CutPrefix(line, portForwardError); ok && reason != "" {
		// Quoted: the reason is the guest's text and goes into the host's logs.
		return fmt.Errorf("%w: %q", ErrPortForwardRefused, reason)
	}
	return fmt.Errorf("port-forward reply %q: want %q or %q", line, portForwardOK, portForwardError+"<reason>")
}

// readLine reads up to and including a newline, at most max bytes in all, and returns the line without it.
func readLine(r io.Reader, max int) (string, error) {
	line := make([]byte, 0, max)
	var b [1]byte
	for {
		n, err := r.Read(b[:])
		if n == 1 {
			if b[0] == '\n' {
				return string(line), nil
			}
			if len(line)+1 >= max {
				return "", fmt.Errorf("line longer than %d bytes", max)
			}
			line = append(line, b[0])
			continue
		}
		if errors.Is(err, io.EOF) {
			return "", fmt.Errorf("line %q: %w", line, io.ErrUnexpectedEOF)
		}
		if err != nil {
			return "", err
		}
	}
}

// halfCloser is a connection whose sending side can be shut alone (TCP, vsock, Unix).
type halfCloser interface {
	CloseWrite() error
}

// HalfCloseGrace is how long RelayPortForward carries the other direction after one ended. containerd's CRI gives
// it a second, then closes the client's stream: what comes later reaches no one, and a pod's server that neither
// answers nor closes held the relay, its connections and a port-forward slot of the pod's for good.
const HalfCloseGrace = 5 * time.Second

// RelayPortForward carries a forwarded stream between a and b, as both ends of the protocol do once the reply is
// "ok": it copies each way until both directions end, or HalfCloseGrace after the first did. When one side's
// stream ends, the other side's write half is shut, so that its peer reads the end and may still answer (an
// HTTP/1.0 client does exactly that). A connection without half-close is closed instead, and a copy that fails
// closes both, so that neither direction is left waiting. The caller closes both connections afterwards.
func RelayPortForward(a, b net.Conn) error {
	return relayPortForward(a, b, HalfCloseGrace)
}

func relayPortForward(a, b net.Conn, grace time.Duration) error {
	errs := make(chan error, 2)
	pipe := func(dst, src net.Conn) {
		_, err := io.Copy(dst, src)
		if hc, ok := dst.(halfCloser); ok && err == nil {
			_ = hc.CloseWrite()
		} else {
			_ = dst.Close()
		}
		if err != nil {
			_ = src.Close()
			if errors.Is(err, net.ErrClosed) || errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE) {
				// A side that went away or was closed by its owner: how a forwarded stream often ends.
				err = nil
			}
		}
		errs <- err
	}
	go pipe(a, b)
	go pipe(b, a)
	first := <-errs
	t := time.NewTimer(grace)
	defer t.Stop()
	select {
	case second := <-errs:
		return errors.Join(first, second)
	case <-t.C:
		// Closing both ends the copy left; its error is the closed connection's, which is no failure.
		_ = a.Close()
		_ = b.Close()
		return errors.Join(first, <-errs)
	}
}
