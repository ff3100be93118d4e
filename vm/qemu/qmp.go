package qemu

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/digitalocean/go-qemu/qmp"
	"golang.org/x/sys/unix"
)

// qmpConn is a connected QMP monitor.
type qmpConn struct {
	mon *qmp.SocketMonitor
}

// qmpDialTimeout bounds dialQMP as a whole, whatever ctx allows: a QEMU stuck before its main loop (one whose
// vhost-user back end was stopped, or one that was stopped itself) takes connections into the listening socket's
// backlog and never answers, and each handshake's own bound only made the dial try again, for good under a
// context with no deadline (ctr's Create, a spare's boot), holding the VM's lock that its Stop needs.
const qmpDialTimeout = 2 * qmpHandshakeTimeout

// dialQMP connects to QEMU's QMP socket, retrying until QEMU has created it, QEMU exits, ctx ends, or
// qmpDialTimeout passed.
func dialQMP(ctx context.Context, path string, exited <-chan struct{}) (*qmpConn, error) {
	return dialQMPWithin(ctx, path, exited, qmpDialTimeout)
}

func dialQMPWithin(ctx context.Context, path string, exited <-chan struct{}, within time.Duration) (*qmpConn, error) {
	ctx, cancel := context.WithTimeout(ctx, within)
	defer cancel()
	var lastErr error
	for {
		mon, err := qmp.NewSocketMonitor("unix", path, 2*time.Second)
		if err == nil {
			if err = connectQMP(ctx, mon, exited); err == nil {
				return &qmpConn{mon: mon}, nil
			}
		}
		lastErr = err
		select {
		case <-exited:
			return nil, fmt.Errorf("QEMU exited before its QMP socket answered")
		case <-ctx.Done():
			return nil, fmt.Errorf("connect QMP %s: %w (last error: %v)", path, ctx.Err(), lastErr)
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// qmpHandshakeTimeout bounds QMP's handshake: QEMU's greeting and its answer to qmp_capabilities.
const qmpHandshakeTimeout = 30 * time.Second

// connectQMP runs QMP's handshake on mon, bounded: the library reads QEMU's greeting and answer with no limit of
// their own, so a QEMU that accepts the connection and says nothing (one a guest took over) would hold the VM's
// start, and with it the Machine's lock that its Stop needs. A failed handshake closes the connection.
func connectQMP(ctx context.Context, mon *qmp.SocketMonitor, exited <-chan struct{}) error {
	done := make(chan error, 1)
	go func() { done <- mon.Connect() }()
	t := time.NewTimer(qmpHandshakeTimeout)
	defer t.Stop()
	var err error
	select {
	case err = <-done:
		if err == nil {
			return nil
		}
		_ = mon.Disconnect()
		return err
	case <-exited:
		err = errors.New("QEMU exited during the QMP handshake")
	case <-ctx.Done():
		err = ctx.Err()
	case <-t.C:
		err = fmt.Errorf("no QMP handshake within %s", qmpHandshakeTimeout)
	}
	_ = mon.Disconnect()
	<-done // the closed connection ends the handshake's read
	return err
}

// qmpRequest encodes one QMP command.
func qmpRequest(name string, arguments any) ([]byte, error) {
	req := map[string]any{"execute": name}
	if arguments != nil {
		req["arguments"] = arguments
	}
	b, err := json.Marshal(req)
	if err != nil {
		return nil, fmt.Errorf("encode QMP %s: %w", name, err)
	}
	return b, nil
}

// execute runs one QMP command; result, when not nil, receives the "return" value.
func (q *qmpConn) execute(ctx context.Context, name string, arguments, result any) error {
	return q.run(ctx, name, arguments, nil, result)
}

// executeWithFile runs one QMP command that takes a descriptor (getfd), passing f's with it.
func (q *qmpConn) executeWithFile(ctx context.Context, name string, arguments any, f *os.File) error {
	return q.run(ctx, name, arguments, f, nil)
}

// qmpCommandTimeout bounds a QMP command whose caller set no deadline (a hot-plug under a task's request): a
// QEMU that stops answering must not hold its caller, which may hold the Machine's lock that Stop needs.
const qmpCommandTimeout = time.Minute

func (q *qmpConn) run(ctx context.Context, name string, arguments any, f *os.File, result any) error {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, qmpCommandTimeout)
		defer cancel()
	}
	b, err := qmpRequest(name, arguments)
	if err != nil {
		return err
	}
	type answer struct {
		raw []byte
		err error
	}
	if f != nil {
		// The command may outlive this call (ctx ends first), and the caller may then close f: the library gets
		// a duplicate of its own.
		fd, err := unix.FcntlInt(f.Fd(), unix.F_DUPFD_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("QMP %s: duplicate the descriptor it takes: %w", name, err)
		}
		f = os.NewFile(uintptr(fd), f.Name())
	}
	done := make(chan answer, 1)
	go func() {
		var raw []byte
		var err error
		if f != nil {
			raw, err = q.mon.RunWithFile(b, f)
			f.Close()
		} else {
			raw, err = q.mon.Run(b)
		}
		done <- answer{raw, err}
	}()
	select {
	case a := <-done:
		if a.err != nil {
			return fmt.Errorf("QMP %s: %w", name, a.err)
		}
		if result != nil {
			var resp struct {
				Return json.RawMessage `json:"return"`
			}
			if err := json.Unmarshal(a.raw, &resp); err != nil {
				return fmt.Errorf("decode QMP %s answer: %w", name, err)
			}
			if err := json.Unmarshal(resp.Return, result); err != nil {
				return fmt.Errorf("decode QMP %s result: %w", name, err)
			}
		}
		return nil
	case <-ctx.Done():
		return fmt.Errorf("QMP %s: %w", name, ctx.Err())
	}
}

func (q *qmpConn) close() { _ = q.mon.Disconnect() }
