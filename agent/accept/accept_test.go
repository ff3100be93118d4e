package accept

import (
	"context"
	"errors"
	"net"
	"os"
	"syscall"
	"testing"
	"time"
)

// scriptedListener returns its errors in turn, then a connection.
type scriptedListener struct {
	net.Listener
	errs  []error
	calls int
}

func (l *scriptedListener) Accept() (net.Conn, error) {
	l.calls++
	if len(l.errs) > 0 {
		err := l.errs[0]
		l.errs = l.errs[1:]
		return nil, err
	}
	a, _ := net.Pipe()
	return a, nil
}

func TestNext(t *testing.T) {
	emfile := &net.OpError{Op: "accept", Err: os.NewSyscallError("accept4", syscall.EMFILE)}
	for _, tc := range []struct {
		name    string
		errs    []error
		wantErr bool
		calls   int
	}{
		{"a connection", nil, false, 1},
		{"out of descriptors a while", []error{emfile, emfile, emfile}, false, 4},
		{"closed", []error{net.ErrClosed}, true, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l := &scriptedListener{errs: tc.errs}
			c, err := Next(context.Background(), l)
			if (err != nil) != tc.wantErr || l.calls != tc.calls {
				t.Errorf("Next = %v, %v after %d accepts; want error %v after %d", c, err, l.calls, tc.wantErr, tc.calls)
			}
			if c != nil {
				c.Close()
			}
		})
	}
	// Out of descriptors for good: ctx ends the wait.
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	l := &scriptedListener{errs: make([]error, 1000)}
	for i := range l.errs {
		l.errs[i] = emfile
	}
	if _, err := Next(ctx, l); !errors.Is(err, syscall.EMFILE) {
		t.Errorf("Next when ctx ends: %v, want the last accept error", err)
	}
}
