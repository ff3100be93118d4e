package agentv1

import (
	"bytes"
	"errors"
	"io"
	"net"
	"strings"
	"testing"
	"testing/iotest"
	"time"
)

func TestPortForwardRequest(t *testing.T) {
	for _, port := range []uint16{1, 80, 8080, 65535} {
		var b bytes.Buffer
		if err := WritePortForwardRequest(&b, port); err != nil {
			t.Fatal(err)
		}
		b.WriteString("GET / HTTP/1.0\r\n")
		got, err := ReadPortForwardRequest(&b)
		if err != nil || got != port {
			t.Errorf("port %d: read back %d, %v", port, got, err)
		}
		// The stream's first bytes stay unread.
		if rest := b.String(); rest != "GET / HTTP/1.0\r\n" {
			t.Errorf("port %d: after the request %q is left, want the stream's bytes", port, rest)
		}
	}
	if err := WritePortForwardRequest(io.Discard, 0); err == nil {
		t.Error("request for port 0 written")
	}
}

func TestReadPortForwardRequestRefuses(t *testing.T) {
	for _, tc := range []struct{ name, in, want string }{
		{"empty", "\n", "want a port number"},
		{"zero", "0\n", "from 1 to 65535"},
		{"too big", "65536\n", "from 1 to 65535"},
		{"sign", "+80\n", "want a port number"},
		{"space", " 80\n", "want a port number"},
		{"name", "http\n", "want a port number"},
		{"no newline within the bound", "000080\n", "longer than"},
		{"endless", strings.Repeat("1", 1<<20), "longer than"},
		{"cut short", "80", "unexpected EOF"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// One byte per read, as from a slow peer.
			_, err := ReadPortForwardRequest(iotest.OneByteReader(strings.NewReader(tc.in)))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("ReadPortForwardRequest(%.20q) = %v, want an error with %q", tc.in, err, tc.want)
			}
		})
	}
}

func TestPortForwardReply(t *testing.T) {
	var b bytes.Buffer
	if err := WritePortForwardReply(&b, nil); err != nil {
		t.Fatal(err)
	}
	b.WriteString("HTTP/1.0 200 OK")
	if err := ReadPortForwardReply(&b); err != nil {
		t.Errorf("ok reply read as %v", err)
	}
	if b.String() != "HTTP/1.0 200 OK" {
		t.Errorf("after the reply %q is left", b.String())
	}

	// A reason with newlines stays on one line; a long one is cut to the bound and still reads.
	long := errors.New("dial tcp 127.0.0.1:80: connect: connection refused\nsecond line " + strings.Repeat("x", 2*MaxPortForwardReply))
	b.Reset()
	if err := WritePortForwardReply(&b, long); err != nil {
		t.Fatal(err)
	}
	if b.Len() > MaxPortForwardReply {
		t.Errorf("reply of %d bytes, bound %d", b.Len(), MaxPortForwardReply)
	}
	err := ReadPortForwardReply(&b)
	if !errors.Is(err, ErrPortForwardRefused) || !strings.Contains(err.Error(), "connection refused second line xxx") {
		t.Errorf("error reply read as %v", err)
	}
	if b.Len() != 0 {
		t.Errorf("%d bytes left after an error reply", b.Len())
	}
}

func TestReadPortForwardReplyRefuses(t *testing.T) {
	for _, tc := range []struct{ name, in, want string }{
		{"empty", "\n", "want"},
		{"unknown word", "yes\n", "want"},
		{"error without reason", "error \n", "want"},
		{"endless", strings.Repeat("x", 1<<20), "longer than"},
		{"just under the bound but no newline", strings.Repeat("x", MaxPortForwardReply-1), "unexpected EOF"},
		{"one over the bound", strings.Repeat("x", MaxPortForwardReply) + "\n", "longer than"},
		{"cut short", "o", "unexpected EOF"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := ReadPortForwardReply(strings.NewReader(tc.in))
			if err == nil || errors.Is(err, ErrPortForwardRefused) || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("ReadPortForwardReply(%.20q) = %v, want an error with %q", tc.in, err, tc.want)
			}
		})
	}
	// A guest's reason cannot forge a line in the host's log.
	err := ReadPortForwardReply(strings.NewReader("error a\rb\x1b[31m\n"))
	if !errors.Is(err, ErrPortForwardRefused) || strings.ContainsAny(err.Error(), "\r\x1b") {
		t.Errorf("reason with control bytes read as %q", err)
	}
}

func FuzzReadPortForwardReply(f *testing.F) {
	f.Add([]byte("ok\n"))
	f.Add([]byte("error connection refused\n"))
	f.Add([]byte("65535\n"))
	f.Fuzz(func(t *testing.T, in []byte) {
		r := bytes.NewReader(in)
		_ = ReadPortForwardReply(r)
		if used := len(in) - r.Len(); used > MaxPortForwardReply {
			t.Errorf("read %d bytes, bound %d", used, MaxPortForwardReply)
		}
		r = bytes.NewReader(in)
		if _, err := ReadPortForwardRequest(r); err == nil && len(in)-r.Len() > maxPortForwardRequest {
			t.Errorf("request of %d bytes accepted", len(in)-r.Len())
		}
	})
}

// tcpPair is two ends of a loopback TCP connection.
func tcpPair(t *testing.T) (*net.TCPConn, *net.TCPConn) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	dialed := make(chan net.Conn, 1)
	go func() {
		c, _ := net.Dial("tcp", l.Addr().String())
		dialed <- c
	}()
	accepted, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	d := <-dialed
	if d == nil {
		t.Fatal("dial failed")
	}
	t.Cleanup(func() { accepted.Close(); d.Close() })
	return accepted.(*net.TCPConn), d.(*net.TCPConn)
}

// One side's end is carried over as a half-close, and the other side still answers within the grace; a side that
// then neither answers nor closes (a pod's server) no longer holds the relay for good.
func TestRelayPortForwardAfterOneSideEnded(t *testing.T) {
	a, client := tcpPair(t)
	b, server := tcpPair(t)
	done := make(chan error, 1)
	go func() { done <- relayPortForward(a, b, 300*time.Millisecond) }()
	if _, err := client.Write([]byte("request")); err != nil {
		t.Fatal(err)
	}
	if err := client.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(server)
	if err != nil || string(got) != "request" {
		t.Fatalf("the server read %q, %v; want the request, then the end", got, err)
	}
	if _, err := server.Write([]byte("answer")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 6)
	if _, err := io.ReadFull(client, buf); err != nil || string(buf) != "answer" {
		t.Fatalf("the client read %q, %v; want the answer after its half-close", buf, err)
	}
	// The server goes quiet, its side open.
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("relay: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the relay still carries a stream 10 s after one side ended, its grace 300 ms")
	}
}
