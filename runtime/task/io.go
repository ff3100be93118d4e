package task

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/containerd/fifo"
	"golang.org/x/sys/unix"

	"github.com/kiln-runtime/kiln/runtime/stdio"
)

// loggerReadyTimeout bounds the wait for a binary:// logger to say it is ready; loggerExitTimeout the wait for
// it to finish once its input is closed.
const (
	loggerReadyTimeout = 10 * time.Second
	loggerExitTimeout  = 10 * time.Second
)

// ioSpec is a process's IO as containerd describes it: fifo paths, or a log URI for stdout and stderr.
type ioSpec struct {
	Stdin, Stdout, Stderr string
	Terminal              bool
}

// procIO is the host end of a process's IO: readers and writers on containerd's fifos or log destinations.
type procIO struct {
	spec    ioSpec
	streams stdio.IO
	closers []io.Closer
	logger  *exec.Cmd
	cancel  context.CancelFunc
	once    sync.Once
}

// drainStdin ends the process's input from containerd's stdin fifo once what it holds has been relayed (CloseIO),
// and says whether there is such an input: a terminal's stays, for a client attaching later.
func (p *procIO) drainStdin() bool {
	r, ok := p.streams.Stdin.(*stdinReader)
	if !ok || p.spec.Terminal {
		return false
	}
	r.Drain()
	return true
}

// holdStdin keeps the process's input open across its client's writer from now on (stdinReader): Create calls it
// once the container exists, Start once an exec runs, where runc's shim opens its own writer.
func (p *procIO) holdStdin() {
	if r, ok := p.streams.Stdin.(*stdinReader); ok {
		r.Hold()
	}
}

// stopStdin stops reading containerd's stdin fifo for a terminal whose input was closed (CloseIO), as runc's shim
// closes its end: a client attaching later types into nothing, instead of into a relay nobody reads.
func (p *procIO) stopStdin() {
	if r, ok := p.streams.Stdin.(*stdinReader); ok {
		_ = r.Close()
	}
}

// openIO connects to containerd's side of a process's IO. id and namespace are handed to a binary:// logger.
func openIO(ctx context.Context, id, namespace string, spec ioSpec) (_ *procIO, retErr error) {
	// The fifo opens wait for their peers in the background for as long as the process lives, not for as
	// long as the request that created it.
	octx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	p := &procIO{spec: spec, cancel: cancel}
	p.streams.Terminal = spec.Terminal
	defer func() {
		if retErr != nil {
			_ = p.Close()
		}
	}()
	if spec.Stdin != "" {
		r, err := newStdinReader(octx, spec.Stdin, spec.Terminal)
		if err != nil {
			return nil, err
		}
		p.streams.Stdin = r
		p.closers = append(p.closers, r)
	}
	if spec.Stdout == "" && spec.Stderr == "" {
		return p, nil
	}
	u, err := url.Parse(spec.Stdout)
	if err != nil {
		return nil, fmt.Errorf("parse stdout %q: %w", spec.Stdout, err)
	}
	switch u.Scheme {
	case "binary":
		if err := p.startLogger(ctx, u, id, namespace); err != nil {
			return nil, err
		}
	case "file":
		if err := os.MkdirAll(filepath.Dir(u.Path), 0o755); err != nil {
			return nil, fmt.Errorf("create log directory for %s: %w", u.Path, err)
		}
		f, err := os.OpenFile(u.Path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o640)
		if err != nil {
			return nil, fmt.Errorf("open log file %s: %w", u.Path, err)
		}
		p.closers = append(p.closers, f)
		p.streams.Stdout = f
		if spec.Stderr != "" && !spec.Terminal {
			p.streams.Stderr = f
		}
	case "", "fifo":
		for _, s := range []struct {
			path string
			w    *io.Writer
		}{{spec.Stdout, &p.streams.Stdout}, {spec.Stderr, &p.streams.Stderr}} {
			if s.path == "" || (spec.Terminal && s.w == &p.streams.Stderr) {
				continue
			}
			path := s.path
			if u, err := url.Parse(path); err == nil && u.Scheme == "fifo" {
				path = u.Path
			}
			f, err := openOutputFifo(path)
			if err != nil {
				return nil, err
			}
			p.closers = append(p.closers, f)
			*s.w = f
		}
	default:
		return nil, fmt.Errorf("stdout %q: unsupported scheme %q (want a fifo path, binary:// or file://)", spec.Stdout, u.Scheme)
	}
	return p, nil
}

// openOutputFifo opens an output fifo for reading and writing: the open does not wait for a reader, and while
// no client reads (after a detach, before an attach) output waits in the pipe instead of failing with EPIPE.
func openOutputFifo(path string) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("open output fifo %s: %w", path, err)
	}
	return f, nil
}

// startLogger runs a binary:// logger: the process's stdout and stderr are its fds 3 and 4, and it closes fd 5
// when it is ready. The URI's query parameters become its arguments, as containerd's runc shim passes them.
func (p *procIO) startLogger(ctx context.Context, u *url.URL, id, namespace string) error {
	var args []string
	q := u.Query()
	keys := make([]string, 0, len(q))
	for k := range q {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		args = append(args, k)
		// A key with an empty value ("?-x=" or "?-x") passes an empty argument, as containerd's shim does.
		if vs := q[k]; len(vs) > 0 {
			args = append(args, vs[0])
		}
	}
	outR, outW, err := os.Pipe()
	if err != nil {
		return fmt.Errorf("logger stdout pipe: %w", err)
	}
	errR, errW, err := os.Pipe()
	if err != nil {
		outR.Close()
		outW.Close()
		return fmt.Errorf("logger stderr pipe: %w", err)
	}
	readyR, readyW, err := os.Pipe()
	if err != nil {
		outR.Close()
		outW.Close()
		errR.Close()
		errW.Close()
		return fmt.Errorf("logger ready pipe: %w", err)
	}
	cmd := exec.Command(u.Path, args...)
	// Only these, as containerd's shim gives its logger: nothing of the shim's own environment.
	cmd.Env = []string{"CONTAINER_ID=" + id, "CONTAINER_NAMESPACE=" + namespace}
	cmd.ExtraFiles = []*os.File{outR, errR, readyW}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	err = cmd.Start()
	outR.Close()
	errR.Close()
	readyW.Close()
	if err != nil {
		outW.Close()
		errW.Close()
		readyR.Close()
		return fmt.Errorf("start logger %s: %w", u.Path, err)
	}
	p.logger = cmd
	p.closers = append(p.closers, outW, errW)
	p.streams.Stdout = outW
	if !p.spec.Terminal {
		p.streams.Stderr = errW
	}
	ready := make(chan error, 1)
	go func() {
		_, err := readyR.Read(make([]byte, 1))
		readyR.Close()
		if errors.Is(err, io.EOF) {
			err = nil
		}
		ready <- err
	}()
	t := time.NewTimer(loggerReadyTimeout)
	defer t.Stop()
	select {
	case err := <-ready:
		if err != nil {
			return fmt.Errorf("wait for logger %s: %w", u.Path, err)
		}
	case <-t.C:
		return fmt.Errorf("logger %s did not become ready within %s", u.Path, loggerReadyTimeout)
	case <-ctx.Done():
		return fmt.Errorf("wait for logger %s: %w", u.Path, ctx.Err())
	}
	return nil
}

// Close releases the host end of the streams; a logger gets EOF and is waited for.
func (p *procIO) Close() error {
	var errs []error
	p.once.Do(func() {
		p.cancel()
		for _, c := range p.closers {
			if err := c.Close(); err != nil && !errors.Is(err, os.ErrClosed) {
				errs = append(errs, err)
			}
		}
		if p.logger != nil {
			done := make(chan error, 1)
			go func() { done <- p.logger.Wait() }()
			select {
			case <-done:
			case <-time.After(loggerExitTimeout):
				_ = p.logger.Process.Kill()
				<-done
				errs = append(errs, fmt.Errorf("logger %s did not exit within %s; killed", p.logger.Path, loggerExitTimeout))
			}
		}
	})
	return errors.Join(errs...)
}

// stdinReader reads containerd's stdin fifo. For a terminal it opens the fifo again after each EOF, so that a
// client attaching later (`ctr task attach`) can type into the same terminal. Otherwise EOF ends the input, which
// the process then reads as EOF, until Hold: from then on it opens the fifo again too, as runc's shim keeps the
// input open with a writer of its own once the process is created (an exec's, started), so that it outlives its
// client's writer: containerd's CRI holds the only other one, and closes it when containerd restarts (a
// container's `cat` would read EOF and end). A client that closed its writer before (`ctr run` with a short
// input, which calls CloseIO only once its task exists) still ends the input so. Drain (CloseIO) ends it too, once
// what the fifo holds has been read, whether or not its writer is still open.
type stdinReader struct {
	ctx    context.Context
	cancel context.CancelFunc
	path   string
	// reopen says EOF opens the fifo again rather than ending the input.
	reopen atomic.Bool
	// drained is closed by Drain.
	drained   chan struct{}
	drainOnce sync.Once

	mu sync.Mutex
	// fifo is the fifo being opened; file, once a writer opened it, its descriptor (pollable, so that Drain can
	// wake a read waiting for input); ready is closed then (or when the open failed: file stays nil).
	fifo   io.Closer
	file   *os.File
	ready  chan struct{}
	closed bool
}

func newStdinReader(ctx context.Context, path string, reopen bool) (*stdinReader, error) {
	ctx, cancel := context.WithCancel(ctx)
	r := &stdinReader{ctx: ctx, cancel: cancel, path: path, drained: make(chan struct{})}
	r.reopen.Store(reopen)
	if err := r.open(); err != nil {
		cancel()
		return nil, err
	}
	return r, nil
}

// open starts opening the fifo: it returns at once, and the file is ready once a writer opened the fifo.
func (r *stdinReader) open() error {
	f, err := fifo.OpenFifo(r.ctx, r.path, syscall.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		return fmt.Errorf("open stdin fifo %s: %w", r.path, err)
	}
	ready := make(chan struct{})
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		_ = f.Close()
		return errors.New("stdin closed")
	}
	old := r.fifo
	r.fifo, r.file, r.ready = f, nil, ready
	r.mu.Unlock()
	if old != nil {
		// The last client's fifo: its read end must go, or a later client would find a reader.
		_ = old.Close()
	}
	go func() {
		defer close(ready)
		file, err := fileOf(f)
		if err == nil {
			r.adopt(f, file)
		}
	}()
	return nil
}

// adopt makes file the descriptor reads use, unless the reader was closed, opened again since (fifo is no longer
// the one being opened), or has one already (a drain read what an early writer left: Read).
func (r *stdinReader) adopt(fifo io.Closer, file *os.File) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed || r.fifo != fifo || r.file != nil {
		_ = file.Close()
		return
	}
	r.file = file
}

// fileOf waits until a writer has opened f (or f is closed) and returns its own descriptor of it, which outlives f.
func fileOf(f io.ReadWriteCloser) (*os.File, error) {
	sc, ok := f.(syscall.Conn)
	if !ok {
		return nil, errors.New("the fifo has no descriptor")
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return nil, err
	}
	dup, derr := -1, error(nil)
	if err := rc.Control(func(fd uintptr) { dup, derr = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0) }); err != nil {
		return nil, err
	}
	if derr != nil {
		return nil, derr
	}
	// The descriptor is non-blocking (Go polls fifos), so the new file is polled too.
	return os.NewFile(uintptr(dup), "stdin fifo"), nil
}

// Read reads from the fifo, opening it again after EOF when reopen is set.
func (r *stdinReader) Read(b []byte) (int, error) {
	for {
		r.mu.Lock()
		ready, closed := r.ready, r.closed
		r.mu.Unlock()
		if closed {
			return 0, io.EOF
		}
		select {
		case <-ready:
		case <-r.drained:
			select {
			case <-ready:
			default:
				// The open has not noticed a writer yet, though one may have opened the fifo, written, and even
				// closed it already (CRI closes its writer, then calls CloseIO): what the pipe holds is read
				// through a descriptor of the drain's own, which a non-blocking open gives at once.
				r.mu.Lock()
				ff := r.fifo
				r.mu.Unlock()
				if f, err := os.OpenFile(r.path, os.O_RDONLY|syscall.O_NONBLOCK, 0); err == nil {
					r.adopt(ff, f)
				}
			}
		}
		r.mu.Lock()
		f := r.file
		r.mu.Unlock()
		if f == nil {
			// Closed, or the open failed.
			return 0, io.EOF
		}
		if isClosed(r.drained) {
			if n := readWhatIsThere(f, b); n > 0 {
				return n, nil
			}
			return 0, io.EOF
		}
		n, err := f.Read(b)
		if n > 0 || err == nil {
			return n, nil
		}
		if errors.Is(err, os.ErrDeadlineExceeded) {
			continue // Drain woke it
		}
		if !r.reopen.Load() || r.ctx.Err() != nil {
			if errors.Is(err, os.ErrClosed) {
				err = io.EOF
			}
			return 0, err
		}
		r.mu.Lock()
		if r.closed {
			r.mu.Unlock()
			continue
		}
		r.file = nil
		r.mu.Unlock()
		_ = f.Close()
		if err := r.open(); err != nil {
			return 0, io.EOF
		}
	}
}

// readWhatIsThere reads what f holds without waiting for more: 0 once it is empty, its writers gone, or failing.
func readWhatIsThere(f *os.File, b []byte) int {
	_ = f.SetReadDeadline(time.Time{})
	rc, err := f.SyscallConn()
	if err != nil {
		return 0
	}
	n := 0
	_ = rc.Read(func(fd uintptr) bool {
		var rerr error
		n, rerr = unix.Read(int(fd), b)
		if rerr != nil {
			n = 0
		}
		return true // never wait for input
	})
	return n
}

func isClosed(c <-chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}

// Hold makes EOF open the fifo again from now on: the input outlives its writers, and only Drain or Close end it.
// A fifo whose writers have all gone already (the client wrote and closed before the process existed) keeps its
// EOF: runc's shim reads its fifo from the start, and would have seen that EOF before it opened its own writer.
func (r *stdinReader) Hold() {
	r.mu.Lock()
	f := r.file
	r.mu.Unlock()
	if f != nil && writersGone(f) {
		return
	}
	r.reopen.Store(true)
}

// writersGone says whether the fifo f reads from had writers, and every one has closed it (poll's POLLHUP).
func writersGone(f *os.File) bool {
	rc, err := f.SyscallConn()
	if err != nil {
		return false
	}
	gone := false
	_ = rc.Control(func(fd uintptr) {
		pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		if n, err := unix.Poll(pfd, 0); err == nil && n > 0 {
			gone = pfd[0].Revents&unix.POLLHUP != 0
		}
	})
	return gone
}

// Drain ends the input once what the fifo holds now has been read, even if its writer stays open: CloseIO, which
// a client calls once it wrote everything (CRI keeps its writer; ctr calls it before closing its own).
func (r *stdinReader) Drain() {
	r.drainOnce.Do(func() {
		r.mu.Lock()
		close(r.drained)
		f := r.file
		r.mu.Unlock()
		if f != nil {
			// Wakes a read waiting for input, which then reads what is there.
			_ = f.SetReadDeadline(time.Now())
		}
	})
}

// Close stops reading; a Read waiting for a writer returns.
func (r *stdinReader) Close() error {
	r.mu.Lock()
	r.closed = true
	ff, f := r.fifo, r.file
	r.file = nil
	r.mu.Unlock()
	r.cancel()
	var err error
	if ff != nil {
		err = ff.Close()
	}
	if f != nil {
		err = errors.Join(err, f.Close())
	}
	return err
}
