package qemu

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"

	"github.com/sirupsen/logrus"

	"github.com/kiln-runtime/kiln/vm"
)

// consoleTailLines is how many guest console lines are kept for error messages.
const consoleTailLines = 30

// Bounds on what a guest can make Kiln keep of its console. The guest is untrusted and the log sits in the
// state directory on /run (tmpfs, host RAM), so both the file and each line are capped:
//   - consoleLogMax: the log is rotated when it would grow past this: console.log is renamed to console.log.1
//     (replacing the previous one) and a new console.log is started, so the last consoleLogMax to
//     2*consoleLogMax bytes of output are kept on disk, never more.
//   - consoleMaxLine: a line longer than this (no newline in sight) is cut into pieces of this size, each
//     written as a line of its own; the copy never stops on a long line.
const (
	consoleLogMax  = 512 << 10
	consoleMaxLine = 4 << 10
)

// console copies the guest's serial output into the per-VM log file, optionally into the host log at debug
// level, and remembers the last lines so a failed boot can say what the guest printed.
type console struct {
	path    string
	maxSize int64
	file    *os.File
	size    int64
	pr      *io.PipeReader
	pw      *io.PipeWriter
	done    chan struct{}
	toLog   bool
	log     *logrus.Entry
	// writeErr is the first error writing the log file; the copy goes on (QEMU must never block on its
	// serial port) and the error is logged once.
	writeErr error

	mu    sync.Mutex
	lines []string
	// awaited is a line await waits for; seen is closed once a line containing it came.
	awaited string
	seen    chan struct{}
}

func newConsole(path string, toLog bool, log *logrus.Entry) (*console, error) {
	return newConsoleSize(path, consoleLogMax, toLog, log)
}

func newConsoleSize(path string, maxSize int64, toLog bool, log *logrus.Entry) (*console, error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open console log: %w", err)
	}
	pr, pw := io.Pipe()
	c := &console{path: path, maxSize: maxSize, file: f, pr: pr, pw: pw, done: make(chan struct{}), toLog: toLog, log: log}
	go func() {
		defer close(c.done)
		c.copy(pr)
	}()
	return c, nil
}

// copy reads r to its end, one line (or one consoleMaxLine piece of a longer line) at a time.
func (c *console) copy(r io.Reader) {
	br := bufio.NewReaderSize(r, consoleMaxLine)
	cut := false // the last piece was cut from a longer line
	for {
		piece, err := br.ReadSlice('\n')
		// The newline right after a cut piece ends that line: it is no empty line of its own.
		if len(piece) > 0 && !(cut && len(bytes.TrimRight(piece, "\r\n")) == 0) {
			c.line(bytes.TrimRight(piece, "\r\n"))
		}
		cut = errors.Is(err, bufio.ErrBufferFull)
		if err != nil && !cut {
			// io.EOF once QEMU is gone (close); a pipe has no other errors.
			return
		}
	}
}

func (c *console) line(b []byte) {
	line := string(b)
	c.write(line)
	if c.toLog {
		c.log.WithField("console", true).Debug(line)
	}
	c.mu.Lock()
	if c.seen != nil && c.awaited != "" && strings.Contains(line, c.awaited) {
		close(c.seen)
		c.awaited = ""
	}
	// Escaped as the guest's words: the tail goes into errors that reach containerd and kubelet (an escaped byte
	// takes at most four, so nothing is cut).
	c.lines = append(c.lines, vm.GuestText(line, 4*consoleMaxLine))
	if len(c.lines) > consoleTailLines {
		c.lines = c.lines[len(c.lines)-consoleTailLines:]
	}
	c.mu.Unlock()
}

// write appends a line to the log file, rotating it first when the line would take it past maxSize.
func (c *console) write(line string) {
	if c.file == nil {
		return
	}
	n := int64(len(line) + 1)
	if c.size > 0 && c.size+n > c.maxSize {
		c.rotate()
		if c.file == nil {
			return
		}
	}
	_, err := c.file.WriteString(line + "\n")
	c.size += n
	c.noteErr(err)
}

func (c *console) rotate() {
	c.noteErr(c.file.Close())
	c.file = nil
	c.size = 0
	if err := os.Rename(c.path, c.path+".1"); err != nil {
		c.noteErr(err)
		return
	}
	f, err := os.OpenFile(c.path, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		c.noteErr(err)
		return
	}
	c.file = f
}

func (c *console) noteErr(err error) {
	if err != nil && c.writeErr == nil {
		c.writeErr = err
		c.log.WithError(err).Warn("guest console log: writing stopped; console lines are still read and dropped")
	}
}

// await returns a channel closed once a console line contains s (among the last lines kept, or a later one).
// One wait at a time.
func (c *console) await(s string) <-chan struct{} {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.seen = make(chan struct{})
	c.awaited = s
	for _, l := range c.lines {
		if strings.Contains(l, s) {
			close(c.seen)
			c.awaited = ""
			break
		}
	}
	return c.seen
}

// writer is what QEMU's stdout (the serial port) is connected to.
func (c *console) writer() io.Writer { return c.pw }

func (c *console) tail() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	var b bytes.Buffer
	for i, l := range c.lines {
		if i > 0 {
			b.WriteByte('\n')
		}
		b.WriteString(l)
	}
	return b.String()
}

// close is called after QEMU exited, so no more output comes.
func (c *console) close() {
	_ = c.pw.Close()
	<-c.done
	if c.file != nil {
		_ = c.file.Close()
	}
}
