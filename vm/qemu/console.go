package qemu

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"

	"github.com/sirupsen/logrus"
)

// consoleTailLines is how many guest console lines are kept for error messages.
const consoleTailLines = 30

// console copies the guest's serial output into the per-VM log file, optionally into the host log at debug
// level, and remembers the last lines so a failed boot can say what the guest printed.
type console struct {
	file *os.File
	pr   *io.PipeReader
	pw   *io.PipeWriter
	done chan struct{}

	mu    sync.Mutex
	lines []string
}

func newConsole(path string, toLog bool, log *logrus.Entry) (*console, error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open console log: %w", err)
	}
	pr, pw := io.Pipe()
	c := &console{file: f, pr: pr, pw: pw, done: make(chan struct{})}
	go func() {
		defer close(c.done)
		sc := bufio.NewScanner(pr)
		sc.Buffer(make([]byte, 4096), 64<<10)
		for sc.Scan() {
			line := strings.TrimRight(sc.Text(), "\r")
			_, _ = f.WriteString(line + "\n")
			if toLog {
				log.WithField("console", true).Debug(line)
			}
			c.mu.Lock()
			c.lines = append(c.lines, line)
			if len(c.lines) > consoleTailLines {
				c.lines = c.lines[len(c.lines)-consoleTailLines:]
			}
			c.mu.Unlock()
		}
		_, _ = io.Copy(io.Discard, pr)
	}()
	return c, nil
}

// writer is what QEMU's stdout (the serial port) is connected to.
func (c *console) writer() io.Writer { return c.pw }

func (c *console) tail() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return strings.Join(c.lines, "\n")
}

// close is called after QEMU exited, so no more output comes.
func (c *console) close() {
	_ = c.pw.Close()
	<-c.done
	_ = c.file.Close()
}
