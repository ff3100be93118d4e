package task

import (
	"bytes"
	"context"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestFileLogURI(t *testing.T) {
	path := filepath.Join(t.TempDir(), "logs", "ctr.log")
	p, err := openIO(context.Background(), "c1", "ns", ioSpec{Stdout: "file://" + path, Stderr: "file://" + path})
	if err != nil {
		t.Fatal(err)
	}
	if p.streams.Stdout == nil || p.streams.Stderr == nil || p.streams.Stdin != nil {
		t.Fatalf("streams %+v: want stdout and stderr, no stdin", p.streams)
	}
	io.WriteString(p.streams.Stdout, "out\n")
	io.WriteString(p.streams.Stderr, "err\n")
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(path)
	if err != nil || string(b) != "out\nerr\n" {
		t.Fatalf("log file %q (%v)", b, err)
	}
}

func TestBinaryLogURI(t *testing.T) {
	dir := t.TempDir()
	out := filepath.Join(dir, "captured")
	script := filepath.Join(dir, "logger")
	// A logger as containerd defines it: stdout on fd 3, stderr on fd 4, ready when fd 5 closes; the URI's
	// query parameters are its arguments, an empty value an empty argument; its environment is the container's id
	// and namespace, nothing of the shim's.
	body := "#!/bin/sh\n[ \"$1\" = dest ] && [ \"$3\" = empty ] && [ \"$4\" = \"\" ] && [ $# = 4 ] || exit 9\nexec 5>&-\n" +
		"cat <&3 > \"$2.out\" &\ncat <&4 > \"$2.err\" &\nwait\necho \"$CONTAINER_ID $CONTAINER_NAMESPACE${KILN_TEST_SHIM_ENV-}\" > \"$2.env\"\n"
	if err := os.WriteFile(script, []byte(body), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv("KILN_TEST_SHIM_ENV", " the shim's environment")
	uri := "binary://" + script + "?dest=" + out + "&empty="
	p, err := openIO(context.Background(), "c2", "ns2", ioSpec{Stdout: uri, Stderr: uri})
	if err != nil {
		t.Fatal(err)
	}
	io.WriteString(p.streams.Stdout, "to stdout\n")
	io.WriteString(p.streams.Stderr, "to stderr\n")
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	for suffix, want := range map[string]string{".out": "to stdout\n", ".err": "to stderr\n", ".env": "c2 ns2\n"} {
		if b, err := os.ReadFile(out + suffix); err != nil || string(b) != want {
			t.Errorf("logger %s: %q (%v), want %q", suffix, b, err, want)
		}
	}
}

func TestFifoIO(t *testing.T) {
	dir := t.TempDir()
	stdin, stdout := filepath.Join(dir, "in"), filepath.Join(dir, "out")
	for _, f := range []string{stdin, stdout} {
		if err := syscall.Mkfifo(f, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	p, err := openIO(context.Background(), "c3", "ns", ioSpec{Stdin: stdin, Stdout: stdout})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	// Output written while no client reads waits in the fifo (a detached task), and a client that opens the
	// fifo later (attach) gets it.
	if _, err := io.WriteString(p.streams.Stdout, "before attach\n"); err != nil {
		t.Fatalf("write with no reader: %v", err)
	}
	r, err := os.Open(stdout)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	buf := make([]byte, 64)
	n, _ := r.Read(buf)
	if got := string(buf[:n]); got != "before attach\n" {
		t.Errorf("attached reader got %q", got)
	}
	// stdin, once the process exists (holdStdin: where runc's shim opens its own writer): what a client writes
	// reaches the process, and its input outlives the client's writer (containerd restarted: CRI held the only
	// other one): what the next writes reaches it too, and only CloseIO ends it.
	p.holdStdin()
	go func() {
		clientsInTurn(stdin, 100*time.Millisecond, "typed\n", "after a restart\n")
		p.drainStdin()
	}()
	got, err := io.ReadAll(p.streams.Stdin)
	if err != nil || string(got) != "typed\nafter a restart\n" {
		t.Errorf("stdin read %q (%v), want both writers' input, then EOF at CloseIO", got, err)
	}
}

// A client that closes its writer before the process exists (`ctr run` with a short input: it calls CloseIO only
// once its task was created) ends the input so, as it would under runc, whose shim reads the fifo from the start
// and opens its own writer only later.
func TestStdinEndsWithAWriterClosedBeforeTheHold(t *testing.T) {
	stdin, p := openStdinIO(t, false)
	w, err := os.OpenFile(stdin, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	io.WriteString(w, "short input\n")
	w.Close()
	// The hold comes once the process exists, before anything read the fifo (Kiln's relay starts with the
	// process's stdio connection).
	deadline := time.Now().Add(5 * time.Second)
	for r := p.streams.Stdin.(*stdinReader); ; time.Sleep(time.Millisecond) {
		r.mu.Lock()
		adopted := r.file != nil
		r.mu.Unlock()
		if adopted || time.Now().After(deadline) {
			break
		}
	}
	p.holdStdin()
	got := make(chan string, 1)
	go func() {
		b, _ := io.ReadAll(p.streams.Stdin)
		got <- string(b)
	}()
	select {
	case s := <-got:
		if s != "short input\n" {
			t.Errorf("stdin read %q", s)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the input did not end with its only writer, closed before the hold")
	}
}

func TestTerminalStdinReopens(t *testing.T) {
	stdin, p := openStdinIO(t, true)
	// Two clients in turn (run -t, then attach after a detach) type into the same terminal.
	go clientsInTurn(stdin, 50*time.Millisecond, "first\n", "second\n")
	var got strings.Builder
	buf := make([]byte, 64)
	deadline := time.Now().Add(5 * time.Second)
	for got.String() != "first\nsecond\n" && time.Now().Before(deadline) {
		n, err := p.streams.Stdin.Read(buf)
		if err != nil {
			t.Fatalf("terminal stdin ended after %q: %v", got.String(), err)
		}
		got.Write(buf[:n])
	}
	if got.String() != "first\nsecond\n" {
		t.Errorf("terminal stdin read %q", got.String())
	}
}

func TestUnsupportedLogScheme(t *testing.T) {
	if _, err := openIO(context.Background(), "c5", "ns", ioSpec{Stdout: "http://example.invalid/x"}); err == nil {
		t.Fatal("openIO accepted an http:// stdout")
	}
}

// CloseIO (Drain) ends stdin after every byte the client wrote, however slowly the process reads them, whether
// the client's writer stays open (CRI's) or closes after (ctr's); and at once when nothing is left or no client
// ever opened the fifo.
func TestStdinDrain(t *testing.T) {
	payload := bytes.Repeat([]byte("0123456789abcdef"), 1<<16) // 1 MiB: 16 pipe buffers
	for _, tc := range []struct {
		name string
		// write is how much the client writes before CloseIO (nil: it never opens the fifo); closeAfter says
		// whether it closes its writer after CloseIO.
		write      []byte
		closeAfter bool
	}{
		{"writer kept open", payload, false},
		{"writer closed after", payload, true},
		{"nothing written", []byte{}, false},
		{"no writer", nil, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path, p := openStdinIO(t, false)
			var w *os.File
			written := make(chan struct{})
			if tc.write != nil {
				go func() {
					defer close(written)
					var err error
					if w, err = os.OpenFile(path, os.O_WRONLY, 0); err != nil {
						t.Error(err)
						return
					}
					if _, err := w.Write(tc.write); err != nil {
						t.Error(err)
					}
				}()
			} else {
				close(written)
			}
			// A process that reads slowly: the client's writes finish only as it reads.
			got := make(chan []byte)
			go func() {
				var b bytes.Buffer
				buf := make([]byte, 4096)
				for {
					n, err := p.streams.Stdin.Read(buf)
					b.Write(buf[:n])
					if err != nil {
						break
					}
					time.Sleep(100 * time.Microsecond)
				}
				got <- b.Bytes()
			}()
			<-written
			if !p.drainStdin() {
				t.Fatal("no stdin to drain")
			}
			if tc.closeAfter {
				time.Sleep(10 * time.Millisecond)
				w.Close()
			} else if w != nil {
				defer w.Close()
			}
			select {
			case b := <-got:
				if want := tc.write; !bytes.Equal(b, want) {
					t.Errorf("the process read %d bytes, want %d", len(b), len(want))
				}
			case <-time.After(10 * time.Second):
				t.Fatal("stdin did not end after CloseIO")
			}
		})
	}
}

// A terminal's input closed (CloseIO) is read no more, as runc's shim closes its end: the relay ends, and a later
// client finds no reader.
func TestTerminalStdinStops(t *testing.T) {
	path, p := openStdinIO(t, true)
	ended := make(chan error, 1)
	got := make(chan string, 1)
	go func() {
		var b strings.Builder
		_, err := io.Copy(&b, p.streams.Stdin)
		got <- b.String()
		ended <- err
	}()
	// A client that typed and detached: the relay opens the fifo again for the next one, and the last one's fifo
	// goes (its read end would stay a reader).
	w, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.WriteString(w, "typed\n"); err != nil {
		t.Fatal(err)
	}
	w.Close()
	time.Sleep(100 * time.Millisecond)
	p.stopStdin()
	select {
	case err := <-ended:
		if err != nil {
			t.Errorf("the relay ended with %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the terminal's relay still reads after its input was closed")
	}
	if s := <-got; s != "typed\n" {
		t.Errorf("the relay read %q", s)
	}
	if f, err := os.OpenFile(path, os.O_WRONLY|syscall.O_NONBLOCK, 0); err == nil {
		f.Close()
		t.Error("a later client still finds a reader")
	}
}

// A client that wrote and closed its writer just before CloseIO (CRI's order) loses nothing, however soon the
// drain comes after the open.
func TestStdinDrainRightAfterTheWrite(t *testing.T) {
	for i := 0; i < 200; i++ {
		path, p := openStdinIO(t, false)
		w, err := os.OpenFile(path, os.O_WRONLY, 0)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := io.WriteString(w, "hello"); err != nil {
			t.Fatal(err)
		}
		w.Close()
		p.drainStdin()
		got, err := io.ReadAll(p.streams.Stdin)
		p.Close()
		if err != nil || string(got) != "hello" {
			t.Fatalf("run %d: read %q (%v), want \"hello\"", i, got, err)
		}
	}
}

// openStdinIO opens a process's IO whose stdin is a new fifo (a terminal's when terminal), closed when the test ends.
func openStdinIO(t *testing.T, terminal bool) (string, *procIO) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "in")
	if err := syscall.Mkfifo(path, 0o600); err != nil {
		t.Fatal(err)
	}
	p, err := openIO(context.Background(), "c", "ns", ioSpec{Stdin: path, Terminal: terminal})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = p.Close() })
	return path, p
}

// clientsInTurn has one client after another open the stdin fifo at path, write its input and close it, gap apart.
func clientsInTurn(path string, gap time.Duration, inputs ...string) {
	for _, in := range inputs {
		w, err := os.OpenFile(path, os.O_WRONLY, 0)
		if err != nil {
			return
		}
		io.WriteString(w, in)
		w.Close()
		time.Sleep(gap)
	}
}
