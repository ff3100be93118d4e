package task

import (
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
	// stdin: what the client writes before closing reaches the process, then EOF.
	go func() {
		w, err := os.OpenFile(stdin, os.O_WRONLY, 0)
		if err != nil {
			return
		}
		io.WriteString(w, "typed\n")
		w.Close()
	}()
	got, err := io.ReadAll(p.streams.Stdin)
	if err != nil || string(got) != "typed\n" {
		t.Errorf("stdin read %q (%v)", got, err)
	}
	select {
	case <-p.stdinEOF:
	case <-time.After(time.Second):
		t.Error("stdin EOF not signalled")
	}
}

func TestTerminalStdinReopens(t *testing.T) {
	dir := t.TempDir()
	stdin := filepath.Join(dir, "in")
	if err := syscall.Mkfifo(stdin, 0o600); err != nil {
		t.Fatal(err)
	}
	p, err := openIO(context.Background(), "c4", "ns", ioSpec{Stdin: stdin, Terminal: true})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	// Two clients in turn (run -t, then attach after a detach) type into the same terminal.
	go func() {
		for _, s := range []string{"first\n", "second\n"} {
			w, err := os.OpenFile(stdin, os.O_WRONLY, 0)
			if err != nil {
				return
			}
			io.WriteString(w, s)
			w.Close()
			time.Sleep(50 * time.Millisecond)
		}
	}()
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
