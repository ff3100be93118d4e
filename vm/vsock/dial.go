package vsock

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"time"
)

// maxHandshakeLine bounds a CONNECT or OK line, so a peer that never sends a newline cannot grow memory.
const maxHandshakeLine = 64

// Dial connects to guest port through the hybrid vsock Unix socket at udsPath: it writes "CONNECT <port>\n"
// and waits for "OK <hostport>\n". The returned conn is a *net.UnixConn carrying the guest stream; nothing
// after the OK line has been read from it. ctx bounds the whole handshake.
func Dial(ctx context.Context, udsPath string, port uint32) (net.Conn, error) {
	var d net.Dialer
	nc, err := d.DialContext(ctx, "unix", udsPath)
	if err != nil {
		return nil, fmt.Errorf("dial vsock port %d through %s: %w", port, udsPath, err)
	}
	if err := handshake(ctx, nc, port); err != nil {
		_ = nc.Close()
		return nil, fmt.Errorf("dial vsock port %d through %s: %w", port, udsPath, err)
	}
	return nc, nil
}

func handshake(ctx context.Context, nc net.Conn, port uint32) (err error) {
	if dl, ok := ctx.Deadline(); ok {
		_ = nc.SetDeadline(dl)
	}
	// A cancelled ctx must interrupt a blocked read; an expired deadline does that.
	stop := context.AfterFunc(ctx, func() { _ = nc.SetDeadline(time.Unix(1, 0)) })
	defer func() {
		if !stop() {
			err = errors.Join(err, context.Cause(ctx))
		}
		_ = nc.SetDeadline(time.Time{})
	}()
	if _, err := fmt.Fprintf(nc, "CONNECT %d\n", port); err != nil {
		return fmt.Errorf("send CONNECT: %w", err)
	}
	line, err := readLine(nc)
	if err != nil {
		return fmt.Errorf("read CONNECT answer: %w", err)
	}
	if _, err := parseLine(line, "OK"); err != nil {
		return fmt.Errorf("CONNECT refused: %w", err)
	}
	return nil
}

// readLine reads one '\n'-terminated line a byte at a time: a buffered reader would swallow stream bytes that
// follow the line, and those belong to the caller.
func readLine(nc net.Conn) (string, error) {
	var line []byte
	var b [1]byte
	for len(line) < maxHandshakeLine {
		n, err := nc.Read(b[:])
		if n == 1 {
			if b[0] == '\n' {
				return strings.TrimSuffix(string(line), "\r"), nil
			}
			line = append(line, b[0])
			continue
		}
		if err != nil {
			return "", err
		}
	}
	return "", fmt.Errorf("line longer than %d bytes", maxHandshakeLine)
}

// parseLine parses "<word> <uint32>".
func parseLine(line, word string) (uint32, error) {
	rest, ok := strings.CutPrefix(line, word+" ")
	if !ok {
		return 0, fmt.Errorf("unexpected line %q", line)
	}
	n, err := strconv.ParseUint(strings.TrimSpace(rest), 10, 32)
	if err != nil {
		return 0, fmt.Errorf("bad port in %q: %w", line, err)
	}
	return uint32(n), nil
}
