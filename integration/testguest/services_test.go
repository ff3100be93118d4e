package main

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kiln-runtime/kiln/integration/testguest/stream"
)

// connectTo runs h on the server end of a unix socket connection, as serve
// does for a vsock connection, and returns the client end. The handler's
// error arrives on the channel once it returns.
func connectTo(t *testing.T, h handler) (*net.UnixConn, <-chan error) {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "s")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	done := make(chan error, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			done <- err
			return
		}
		defer c.Close()
		done <- h(c)
	}()
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(20 * time.Second))
	return c.(*net.UnixConn), done
}

func payload(n int) []byte {
	b := make([]byte, n)
	io.ReadFull(stream.New(7), b)
	return b
}

func TestEchoReturnsAllAndHalfCloses(t *testing.T) {
	c, done := connectTo(t, echo)
	data := payload(1 << 20)
	go func() {
		c.Write(data)
		c.CloseWrite()
	}()
	got, err := io.ReadAll(c) // ends only if echo half-closes
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Errorf("echo returned %d bytes, differing from the %d sent", len(got), len(data))
	}
	if err := <-done; err != nil {
		t.Error(err)
	}
}

func TestSinksReportDigestAndCount(t *testing.T) {
	for _, tc := range []struct {
		name string
		h    handler
		size int
	}{
		{"sink empty", sink, 0},
		{"sink", sink, 300_001},
		{"slow sink exact chunks", slowSink, 2 * slowChunk},
		{"slow sink partial chunk", slowSink, 3*slowChunk + 5},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, done := connectTo(t, tc.h)
			data := payload(tc.size)
			if _, err := c.Write(data); err != nil {
				t.Fatal(err)
			}
			c.CloseWrite()
			reply, err := io.ReadAll(c)
			if err != nil {
				t.Fatal(err)
			}
			sum := sha256.Sum256(data)
			if want := fmt.Sprintf("%s %d\n", hex.EncodeToString(sum[:]), tc.size); string(reply) != want {
				t.Errorf("reply %q, want %q", reply, want)
			}
			if err := <-done; err != nil {
				t.Error(err)
			}
		})
	}
}

func TestSourceSendsTheStream(t *testing.T) {
	c, done := connectTo(t, source)
	fmt.Fprintf(c, "%d %d\n", 100_003, 99)
	got, err := io.ReadAll(c)
	if err != nil {
		t.Fatal(err)
	}
	want := make([]byte, 100_003)
	io.ReadFull(stream.New(99), want)
	if !bytes.Equal(got, want) {
		t.Errorf("source sent %d bytes, not the %d of stream 99", len(got), len(want))
	}
	if err := <-done; err != nil {
		t.Error(err)
	}
}

func TestSourceRejectsBadRequest(t *testing.T) {
	for _, req := range []string{"abc\n", "-1 3\n", "5\n"} {
		c, done := connectTo(t, source)
		io.WriteString(c, req)
		if err := <-done; err == nil {
			t.Errorf("request %q accepted", req)
		}
	}
}

func TestDialBackRelaysHostReply(t *testing.T) {
	// The "host" side of the dial-back: a listener that greets back.
	hostSock := filepath.Join(t.TempDir(), "host")
	hl, err := net.Listen("unix", hostSock)
	if err != nil {
		t.Fatal(err)
	}
	defer hl.Close()
	greeting := make(chan string, 1)
	go func() {
		hc, err := hl.Accept()
		if err != nil {
			return
		}
		defer hc.Close()
		line, _ := bufio.NewReader(hc).ReadString('\n')
		greeting <- line
		io.WriteString(hc, "hello from host\n")
	}()
	var dialed uint32
	dial := func(port uint32) (net.Conn, error) {
		dialed = port
		return net.Dial("unix", hostSock)
	}

	c, done := connectTo(t, dialBack(dial))
	io.WriteString(c, "7777\n")
	reply, err := io.ReadAll(c)
	if err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if dialed != 7777 {
		t.Errorf("dialed port %d, want 7777", dialed)
	}
	if g := <-greeting; g != "hello from guest\n" {
		t.Errorf("host got %q", g)
	}
	if string(reply) != "hello from host\n" {
		t.Errorf("control connection got %q", reply)
	}
}

func TestDialBackRejectsBadPort(t *testing.T) {
	c, done := connectTo(t, dialBack(func(uint32) (net.Conn, error) {
		t.Error("dialed despite a bad port")
		return nil, io.EOF
	}))
	io.WriteString(c, "port 1\n")
	if err := <-done; err == nil || !strings.Contains(err.Error(), "port") {
		t.Errorf("error = %v", err)
	}
}
