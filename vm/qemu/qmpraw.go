package qemu

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// qmpMaxLine bounds one line of QMP output Kiln reads on its raw monitor.
const qmpMaxLine = 64 << 10

// rawQMP is a QMP monitor on a connected socket (a template's second monitor) that can pass a descriptor with a
// command (getfd). A template's save needs that: QEMU 7.2 migrates only to a named descriptor. go-qemu's
// monitor on the VM's QMP socket can pass descriptors too (RunWithFile, which Machine.PlugNets uses), so the
// save could go through it and this second monitor go.
type rawQMP struct {
	c *net.UnixConn
	r *bufio.Reader
}

// newRawQMP reads QEMU's greeting on c and enters command mode.
func newRawQMP(ctx context.Context, c *net.UnixConn) (*rawQMP, error) {
	q := &rawQMP{c: c, r: bufio.NewReaderSize(c, qmpMaxLine)}
	stop := q.bound(ctx)
	_, err := q.r.ReadSlice('\n')
	stop()
	if err != nil {
		return nil, fmt.Errorf("read QMP greeting: %w", err)
	}
	if err := q.execute(ctx, "qmp_capabilities", nil, nil, nil); err != nil {
		return nil, err
	}
	return q, nil
}

// bound makes the connection's reads and writes fail when ctx ends; the returned function lifts that.
func (q *rawQMP) bound(ctx context.Context) func() {
	stop := context.AfterFunc(ctx, func() { _ = q.c.SetDeadline(time.Now()) })
	return func() {
		if !stop() {
			_ = q.c.SetDeadline(time.Time{})
		}
	}
}

// execute runs one command; fd, when not nil, rides along with it; result, when not nil, receives the
// "return" value. Events are skipped.
func (q *rawQMP) execute(ctx context.Context, name string, arguments any, fd *os.File, result any) error {
	b, err := qmpRequest(name, arguments)
	if err != nil {
		return err
	}
	stop := q.bound(ctx)
	defer stop()
	var oob []byte
	if fd != nil {
		oob = unix.UnixRights(int(fd.Fd()))
	}
	if _, _, err := q.c.WriteMsgUnix(b, oob, nil); err != nil {
		return fmt.Errorf("QMP %s: %w", name, err)
	}
	for {
		line, err := q.r.ReadSlice('\n')
		if errors.Is(err, bufio.ErrBufferFull) {
			return fmt.Errorf("QMP %s: answer longer than %d bytes", name, qmpMaxLine)
		}
		if err != nil {
			return fmt.Errorf("QMP %s: %w", name, err)
		}
		var resp struct {
			Return json.RawMessage `json:"return"`
			Error  *struct {
				Class string `json:"class"`
				Desc  string `json:"desc"`
			} `json:"error"`
			Event string `json:"event"`
		}
		if err := json.Unmarshal(line, &resp); err != nil {
			return fmt.Errorf("decode QMP %s answer: %w", name, err)
		}
		switch {
		case resp.Event != "":
			continue
		case resp.Error != nil:
			return fmt.Errorf("QMP %s: %s: %s", name, resp.Error.Class, resp.Error.Desc)
		case result != nil:
			if err := json.Unmarshal(resp.Return, result); err != nil {
				return fmt.Errorf("decode QMP %s result: %w", name, err)
			}
		}
		return nil
	}
}

func (q *rawQMP) close() { _ = q.c.Close() }

// socketPair is a connected pair of Unix stream sockets: Kiln's end as a connection, QEMU's as a descriptor.
func socketPair() (*net.UnixConn, *os.File, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("socketpair: %w", err)
	}
	mine := os.NewFile(uintptr(fds[0]), "qmp-kiln")
	defer mine.Close()
	theirs := os.NewFile(uintptr(fds[1]), "qmp-qemu")
	c, err := net.FileConn(mine)
	if err != nil {
		theirs.Close()
		return nil, nil, fmt.Errorf("socketpair: %w", err)
	}
	return c.(*net.UnixConn), theirs, nil
}
