package qemu

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
)

func testConsole(t *testing.T, maxSize int64) (*console, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "console.log")
	log := logrus.New()
	log.SetOutput(io.Discard)
	c, err := newConsoleSize(path, maxSize, false, logrus.NewEntry(log))
	if err != nil {
		t.Fatal(err)
	}
	return c, path
}

func readOr(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	return string(b)
}

// Finding 5: a line longer than 64 KiB stopped the copy for good (bufio.Scanner's limit), so nothing after it
// reached the log.
func TestConsoleKeepsCopyingAfterALongLine(t *testing.T) {
	c, path := testConsole(t, 1<<20)
	long := strings.Repeat("x", 100<<10)
	// The fake guest writes in small chunks, as a serial port does.
	stream := "booting\r\n" + long + "\nafter the long line\nno newline at the end"
	for s := stream; len(s) > 0; {
		n := min(len(s), 1000)
		if _, err := c.writer().Write([]byte(s[:n])); err != nil {
			t.Fatal(err)
		}
		s = s[n:]
	}
	c.close()

	got := readOr(t, path)
	lines := strings.Split(strings.TrimSuffix(got, "\n"), "\n")
	if lines[0] != "booting" {
		t.Errorf("first line %q", lines[0])
	}
	wantPieces := (len(long) + consoleMaxLine - 1) / consoleMaxLine
	if len(lines) != 1+wantPieces+2 {
		t.Fatalf("%d lines, want %d", len(lines), 1+wantPieces+2)
	}
	for i, l := range lines[1 : 1+wantPieces] {
		if len(l) > consoleMaxLine || strings.Trim(l, "x") != "" {
			t.Fatalf("piece %d: %d bytes, want at most %d of the long line", i, len(l), consoleMaxLine)
		}
	}
	if joined := strings.Join(lines[1:1+wantPieces], ""); joined != long {
		t.Errorf("the long line's pieces hold %d bytes, want %d", len(joined), len(long))
	}
	if lines[len(lines)-2] != "after the long line" || lines[len(lines)-1] != "no newline at the end" {
		t.Errorf("last lines %q", lines[len(lines)-2:])
	}
	if tail := c.tail(); !strings.HasSuffix(tail, "after the long line\nno newline at the end") {
		t.Errorf("tail ends %q", tail[max(0, len(tail)-60):])
	}
}

// Finding 5: the log grew without a cap. It is rotated once, so at most 2*max bytes stay on disk, and the
// newest output is always in console.log.
func TestConsoleLogIsCapped(t *testing.T) {
	const maxSize = 64 << 10
	c, path := testConsole(t, maxSize)
	for i := range 20000 {
		last := fmt.Sprintf("line %06d %s", i, strings.Repeat("y", 40))
		if _, err := io.WriteString(c.writer(), last+"\n"); err != nil {
			t.Fatal(err)
		}
	}
	// A flood with no newline at all is capped as well.
	if _, err := c.writer().Write(bytes.Repeat([]byte("z"), 10*maxSize)); err != nil {
		t.Fatal(err)
	}
	if _, err := io.WriteString(c.writer(), "\nthe end\n"); err != nil {
		t.Fatal(err)
	}
	c.close()

	cur, old := readOr(t, path), readOr(t, path+".1")
	if len(cur) > maxSize || len(old) > maxSize {
		t.Errorf("console.log %d bytes, console.log.1 %d bytes: want each at most %d", len(cur), len(old), maxSize)
	}
	if !strings.HasSuffix(cur, "the end\n") {
		t.Errorf("console.log does not end with the newest line: ...%q", cur[max(0, len(cur)-40):])
	}
	entries, err := os.ReadDir(filepath.Dir(path))
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 2 {
		t.Errorf("%d files beside the console log, want console.log and console.log.1", len(entries))
	}
	if len(c.lines) > consoleTailLines {
		t.Errorf("%d tail lines kept, want at most %d", len(c.lines), consoleTailLines)
	}
}

func TestConsoleAwait(t *testing.T) {
	c, _ := testConsole(t, consoleLogMax)
	w := bufio.NewWriter(c.writer())
	_, _ = w.WriteString("early line\n")
	_ = w.Flush()
	seen := c.await("template ready")
	_, _ = io.WriteString(c.writer(), "booting\n")
	select {
	case <-seen:
		t.Fatal("await returned before the line came")
	case <-time.After(20 * time.Millisecond):
	}
	_, _ = io.WriteString(c.writer(), "kiln-agent: template ready\n")
	<-seen
	// A line seen before the wait counts too.
	<-c.await("early line")
	c.close()
}

// The console's tail goes into errors that reach containerd and kubelet: a guest's terminal escapes and bytes
// that are not text are escaped there, one console line per tail line.
func TestConsoleTailIsEscaped(t *testing.T) {
	c, _ := testConsole(t, 1<<20)
	if _, err := c.writer().Write([]byte("\x1b[2J\x1b]0;owned\a\xff\r\nplain line\n")); err != nil {
		t.Fatal(err)
	}
	c.close()
	if got, want := c.tail(), `\x1b[2J\x1b]0;owned\a\xff`+"\nplain line"; got != want {
		t.Errorf("tail %q, want %q", got, want)
	}
}
