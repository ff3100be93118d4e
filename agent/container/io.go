package container

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"time"

	"github.com/opencontainers/runc/libcontainer"
	"github.com/opencontainers/runc/libcontainer/utils"
	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/kiln-runtime/kiln/agent/stdio"
	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
)

// Timings of a process's stdio.
const (
	// drainIdle is how long output may stay silent after the process exited
	// before its copy stops: output is complete at EOF, but a background
	// child that kept the pipe open would otherwise hold the exit report
	// forever.
	drainIdle = time.Second
	// stdinIdle is how long the stdin connection may stay silent after
	// CloseStdin before the process's stdin is closed: bytes the host sent
	// just before the request may still be on their way.
	stdinIdle = 250 * time.Millisecond
	// lingerTimeout bounds how long a half-closed output connection waits
	// for the host to hang up.
	lingerTimeout = 30 * time.Second
	// hostStalledTimeout bounds how long, once the process exited, output
	// may wait for a host that takes none (its reader stalled, the
	// connection's credit spent): without it the exit would never be
	// reported and the container could not even be killed.
	hostStalledTimeout = 10 * time.Second
)

// wantedStreams lists the connections a request's Stdio asks for.
func wantedStreams(s *agentv1.Stdio) []stdio.Stream {
	if s == nil {
		return nil
	}
	if s.GetTerminal() {
		return []stdio.Stream{stdio.TTY}
	}
	var out []stdio.Stream
	if s.GetStdin() {
		out = append(out, stdio.Stdin)
	}
	if s.GetStdout() {
		out = append(out, stdio.Stdout)
	}
	if s.GetStderr() {
		out = append(out, stdio.Stderr)
	}
	return out
}

// processIO connects a process's stdio to its connections: pipes, or a
// pty whose master comes back through libcontainer's console socket.
type processIO struct {
	log      *logrus.Entry
	terminal bool
	ttyInput bool
	conns    map[stdio.Stream]net.Conn

	// childFiles are the process's ends, closed here once it started.
	childFiles []*os.File
	stdinW     *os.File
	outputs    map[stdio.Stream]*os.File
	consoleR   *os.File // our end of the console socket
	master     *os.File

	copies      sync.WaitGroup
	stdinClose  chan struct{} // closed by CloseStdin
	stdinOnce   sync.Once
	exited      chan struct{} // closed when the process has exited
	exitedOnce  sync.Once
	inputClosed chan struct{}
	// hostTimeout is hostStalledTimeout; tests shorten it.
	hostTimeout time.Duration
}

// newProcessIO prepares the process's ends and sets them on lp.
func newProcessIO(log *logrus.Entry, s *agentv1.Stdio, conns map[stdio.Stream]net.Conn, lp *libcontainer.Process) (_ *processIO, err error) {
	pio := &processIO{
		log:         log,
		terminal:    s.GetTerminal(),
		ttyInput:    s.GetTerminal() && s.GetStdin(),
		conns:       conns,
		outputs:     map[stdio.Stream]*os.File{},
		stdinClose:  make(chan struct{}),
		exited:      make(chan struct{}),
		hostTimeout: hostStalledTimeout,
		inputClosed: make(chan struct{}),
	}
	defer func() {
		if err != nil {
			pio.abort()
		}
	}()
	if pio.terminal {
		parent, child, err := utils.NewSockPair("console")
		if err != nil {
			return nil, fmt.Errorf("create console socket: %w", err)
		}
		pio.consoleR = parent
		pio.childFiles = append(pio.childFiles, child)
		lp.ConsoleSocket = child
		return pio, nil
	}
	if _, ok := conns[stdio.Stdin]; ok {
		r, w, err := os.Pipe()
		if err != nil {
			return nil, fmt.Errorf("create stdin pipe: %w", err)
		}
		pio.childFiles = append(pio.childFiles, r)
		pio.stdinW = w
		lp.Stdin = r
	}
	for _, st := range []stdio.Stream{stdio.Stdout, stdio.Stderr} {
		if _, ok := conns[st]; !ok {
			continue
		}
		r, w, err := os.Pipe()
		if err != nil {
			return nil, fmt.Errorf("create %s pipe: %w", st, err)
		}
		if err := growPipe(r); err != nil {
			// The pipe works at the kernel's default size, only slower.
			log.WithError(err).WithField("stream", st).Debug("output pipe keeps its default size")
		}
		pio.childFiles = append(pio.childFiles, w)
		pio.outputs[st] = r
		if st == stdio.Stdout {
			lp.Stdout = w
		} else {
			lp.Stderr = w
		}
	}
	return pio, nil
}

// outputPipeSize is the size of a process's stdout and stderr pipes. Under TCG every wake-up of the writer or of
// the agent's copy is emulated work: with the kernel's 64 KiB a writer such as `dd bs=64k` blocks after each write
// until the copy has read it, and stdout ran at 0.23 of runc's; at 1 MiB, 0.28 (docs/fast-start-log.md, session 27).
// The kernel allocates a pipe's pages as they are written, so an idle process's pipes cost no more.
const outputPipeSize = 1 << 20

// growPipe makes the pipe of f hold outputPipeSize.
func growPipe(f *os.File) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := rc.Control(func(fd uintptr) { _, serr = unix.FcntlInt(fd, unix.F_SETPIPE_SZ, outputPipeSize) }); err != nil {
		return err
	}
	if serr != nil {
		return fmt.Errorf("set pipe size to %d: %w", outputPipeSize, serr)
	}
	return nil
}

// started runs once the process exists: it drops the process's ends (so
// that EOF comes when the process closes them), takes the pty master and
// starts copying.
func (p *processIO) started() error {
	for _, f := range p.childFiles {
		f.Close()
	}
	p.childFiles = nil
	if p.terminal {
		master, err := receiveMaster(p.consoleR)
		p.consoleR.Close()
		p.consoleR = nil
		if err != nil {
			return err
		}
		p.master = master
		conn := p.conns[stdio.TTY]
		p.copies.Add(1)
		go p.copyOutput(stdio.TTY, master, conn)
		if p.ttyInput {
			go p.copyInput(conn, master, false)
		} else {
			close(p.inputClosed)
		}
		return nil
	}
	for st, r := range p.outputs {
		p.copies.Add(1)
		go p.copyOutput(st, r, p.conns[st])
	}
	if c, ok := p.conns[stdio.Stdin]; ok {
		go p.copyInput(c, p.stdinW, true)
	} else {
		close(p.inputClosed)
	}
	return nil
}

// receiveMaster takes the pty master the container's init sends over the
// console socket (one SCM_RIGHTS message whose data is the file's name) and
// makes it non-blocking, so that reads can have deadlines.
func receiveMaster(sock *os.File) (*os.File, error) {
	raw, err := sock.SyscallConn()
	if err != nil {
		return nil, fmt.Errorf("receive pty master: %w", err)
	}
	var fd int
	var recvErr error
	if err := raw.Control(func(s uintptr) { fd, recvErr = recvOneFd(int(s)) }); err != nil {
		return nil, fmt.Errorf("receive pty master: %w", err)
	}
	if recvErr != nil {
		return nil, fmt.Errorf("receive pty master: %w", recvErr)
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("make pty master non-blocking: %w", err)
	}
	return os.NewFile(uintptr(fd), "pty-master"), nil
}

// recvOneFd reads one message from the Unix socket sock and returns the
// single descriptor it carries (close-on-exec). Every descriptor that came
// along with an error is closed.
func recvOneFd(sock int) (int, error) {
	data := make([]byte, 4096)
	oob := make([]byte, unix.CmsgSpace(4*4))
	var n, oobn, flags int
	var err error
	for {
		n, oobn, flags, _, err = unix.Recvmsg(sock, data, oob, unix.MSG_CMSG_CLOEXEC)
		if !errors.Is(err, unix.EINTR) {
			break
		}
	}
	if err != nil {
		return -1, fmt.Errorf("recvmsg: %w", err)
	}
	msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
	if err != nil {
		return -1, fmt.Errorf("parse control message: %w", err)
	}
	var fds []int
	for i := range msgs {
		if msgs[i].Header.Level != unix.SOL_SOCKET || msgs[i].Header.Type != unix.SCM_RIGHTS {
			continue
		}
		got, err := unix.ParseUnixRights(&msgs[i])
		if err != nil {
			closeAll(fds)
			return -1, fmt.Errorf("parse SCM_RIGHTS: %w", err)
		}
		fds = append(fds, got...)
	}
	switch {
	case flags&unix.MSG_CTRUNC != 0:
		closeAll(fds)
		return -1, errors.New("control message truncated")
	case len(fds) != 1:
		closeAll(fds)
		return -1, fmt.Errorf("got %d descriptors in a %d-byte message, want 1", len(fds), n)
	}
	return fds[0], nil
}

func closeAll(fds []int) {
	for _, fd := range fds {
		unix.Close(fd)
	}
}

// copyOutput copies until EOF (EIO for a pty whose slave side is closed),
// or until the source stays silent for drainIdle after the process exited
// (finish sets the first deadline); then it half-closes the connection.
func (p *processIO) copyOutput(st stdio.Stream, src *os.File, dst net.Conn) {
	defer p.copies.Done()
	buf := make([]byte, 128<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				p.log.WithError(werr).WithField("stream", st).Debug("stdio connection closed by the host")
				// Keep reading so that the process never blocks on a full pipe.
				_, _ = io.Copy(io.Discard, src)
				break
			}
			if isClosed(p.exited) {
				_ = src.SetReadDeadline(time.Now().Add(drainIdle))
			}
		}
		if err != nil {
			switch {
			case errors.Is(err, os.ErrDeadlineExceeded):
				p.log.WithField("stream", st).Debug("output still open after exit; stopped copying")
			case errors.Is(err, io.EOF), errors.Is(err, unix.EIO), errors.Is(err, os.ErrClosed):
			default:
				p.log.WithError(err).WithField("stream", st).Warn("read process output")
			}
			break
		}
	}
	halfClose(dst)
}

// copyInput copies the host's input to the process until the connection
// ends, or goes quiet for stdinIdle after CloseStdin (which sets the first
// deadline). closeDst says whether the end closes dst (a stdin pipe: the
// process reads EOF) or merely stops (a pty master, which stays open for
// output).
func (p *processIO) copyInput(src net.Conn, dst *os.File, closeDst bool) {
	defer close(p.inputClosed)
	buf := make([]byte, 64<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				break
			}
			if isClosed(p.stdinClose) {
				_ = src.SetReadDeadline(time.Now().Add(stdinIdle))
			}
		}
		if err != nil {
			break
		}
	}
	if closeDst {
		dst.Close()
	}
}

func isClosed(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

// closeStdin asks for the process's stdin to be closed once the host's
// input has gone quiet.
func (p *processIO) closeStdin() {
	p.stdinOnce.Do(func() {
		close(p.stdinClose)
		in := p.conns[stdio.Stdin]
		if p.terminal {
			in = p.conns[stdio.TTY]
		}
		if in != nil {
			_ = in.SetReadDeadline(time.Now().Add(stdinIdle))
		}
	})
}

// resize sets the pty's window size; the kernel sends SIGWINCH.
func (p *processIO) resize(width, height uint32) error {
	if p.master == nil {
		return errors.New("process has no terminal")
	}
	raw, err := p.master.SyscallConn()
	if err != nil {
		return fmt.Errorf("resize terminal: %w", err)
	}
	var ioctlErr error
	err = raw.Control(func(fd uintptr) {
		ioctlErr = unix.IoctlSetWinsize(int(fd), unix.TIOCSWINSZ, &unix.Winsize{Row: uint16(height), Col: uint16(width)})
	})
	if err == nil {
		err = ioctlErr
	}
	if err != nil {
		return fmt.Errorf("resize terminal to %dx%d: %w", width, height, err)
	}
	return nil
}

// finish runs after the process exited: it returns once every output
// connection has all the output and is half-closed. The connections are
// closed in the background once the host hangs up.
func (p *processIO) finish() {
	p.exitedOnce.Do(func() { close(p.exited) })
	deadline := time.Now().Add(drainIdle)
	for _, r := range p.outputs {
		_ = r.SetReadDeadline(deadline)
	}
	if p.master != nil {
		_ = p.master.SetReadDeadline(deadline)
	}
	// A copy blocked writing to a host that takes nothing more gives up then.
	for st, c := range p.conns {
		if st != stdio.Stdin {
			_ = c.SetWriteDeadline(time.Now().Add(p.hostTimeout))
		}
	}
	p.copies.Wait()
	if c := p.conns[stdio.Stdin]; c != nil {
		// Input is pointless now; this also ends copyInput.
		c.Close()
	}
	if p.terminal && p.ttyInput {
		// The tty connection carries input too: stop reading it, keep it
		// for the half-close below.
		_ = p.conns[stdio.TTY].SetReadDeadline(time.Now())
		// Nor keep writing it: a process left holding the terminal (a background job in raw mode) that reads
		// nothing would hold the copy, and the exit, for as long as it lives.
		if p.master != nil {
			_ = p.master.SetWriteDeadline(time.Now())
		}
		<-p.inputClosed
	}
	if p.master != nil {
		p.master.Close()
	}
	for _, r := range p.outputs {
		r.Close()
	}
	for st, c := range p.conns {
		if st == stdio.Stdin {
			continue
		}
		go linger(c)
	}
}

// abort releases everything of a process that never started.
func (p *processIO) abort() {
	for _, f := range p.childFiles {
		f.Close()
	}
	for _, f := range []*os.File{p.stdinW, p.consoleR, p.master} {
		if f != nil {
			f.Close()
		}
	}
	for _, r := range p.outputs {
		r.Close()
	}
	for _, c := range p.conns {
		c.Close()
	}
}

func halfClose(c net.Conn) {
	if hc, ok := c.(interface{ CloseWrite() error }); ok {
		_ = hc.CloseWrite()
		return
	}
	c.Close()
}

// linger keeps a half-closed connection until the host hangs up, so that
// closing it cannot cut output still in flight.
func linger(c net.Conn) {
	_ = c.SetReadDeadline(time.Now().Add(lingerTimeout))
	_, _ = io.Copy(io.Discard, c)
	c.Close()
}
