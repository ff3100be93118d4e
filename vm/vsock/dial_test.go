package vsock

import (
	"context"
	"io"
	"net"
	"path/filepath"
	"testing"
	"time"
)

// fakeHybridServer answers one client with answer, written in a single write, after reading its CONNECT line.
func fakeHybridServer(t *testing.T, answer string) (path string, gotLine <-chan string) {
	path = filepath.Join(t.TempDir(), "h.sock")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	lines := make(chan string, 1)
	done := make(chan struct{})
	t.Cleanup(func() { l.Close(); <-done })
	go func() {
		defer close(done)
		c, err := l.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		line, _ := readLine(c)
		lines <- line
		if answer != "" {
			c.Write([]byte(answer))
		}
		io.Copy(io.Discard, c) // hold the connection until the client closes
	}()
	return path, lines
}

func TestDialKeepsBytesAfterOKLine(t *testing.T) {
	path, lines := fakeHybridServer(t, "OK 1073741824\nstream bytes")
	c, err := Dial(context.Background(), path, 1024)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if l := <-lines; l != "CONNECT 1024" {
		t.Fatalf("server read %q", l)
	}
	b := make([]byte, len("stream bytes"))
	if _, err := io.ReadFull(c, b); err != nil || string(b) != "stream bytes" {
		t.Fatalf("read after handshake %q, %v", b, err)
	}
}

func TestDialRejectsBadAnswers(t *testing.T) {
	for _, answer := range []string{"NO 1\n", "OK\n", "OK -1\n", "OK 1 2\n", ""} {
		t.Run(answer, func(t *testing.T) {
			path, _ := fakeHybridServer(t, answer)
			ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
			defer cancel()
			if c, err := Dial(ctx, path, 1); err == nil {
				c.Close()
				t.Fatalf("Dial accepted %q", answer)
			}
		})
	}
}

func TestDialHonoursCancel(t *testing.T) {
	path, _ := fakeHybridServer(t, "") // never answers
	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(100*time.Millisecond, cancel)
	start := time.Now()
	if c, err := Dial(ctx, path, 1); err == nil {
		c.Close()
		t.Fatal("Dial succeeded without an answer")
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("Dial returned after %v, cancel was at 100ms", d)
	}
}
