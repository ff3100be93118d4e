package qemu

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"time"

	"github.com/digitalocean/go-qemu/qmp"
)

// qmpConn is a connected QMP monitor.
type qmpConn struct {
	mon *qmp.SocketMonitor
}

// dialQMP connects to QEMU's QMP socket, retrying until QEMU has created it, QEMU exits, or ctx ends.
func dialQMP(ctx context.Context, path string, exited <-chan struct{}) (*qmpConn, error) {
	var lastErr error
	for {
		mon, err := qmp.NewSocketMonitor("unix", path, 2*time.Second)
		if err == nil {
			if err = mon.Connect(); err == nil {
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

func (q *qmpConn) run(ctx context.Context, name string, arguments any, f *os.File, result any) error {
	b, err := qmpRequest(name, arguments)
	if err != nil {
		return err
	}
	type answer struct {
		raw []byte
		err error
	}
	done := make(chan answer, 1)
	go func() {
		var raw []byte
		var err error
		if f != nil {
			raw, err = q.mon.RunWithFile(b, f)
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
