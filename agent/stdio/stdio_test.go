package stdio

import (
	"context"
	"errors"
	"io"
	"net"
	"strings"
	"testing"
	"testing/iotest"
	"time"
)

func TestReadPreamble(t *testing.T) {
	tests := []struct {
		in        string
		key       string
		stream    Stream
		wantError bool
	}{
		{"k1 stdin\n", "k1", Stdin, false},
		{"k1 stdout\nDATA", "k1", Stdout, false},
		{"abc-123 stderr\r\n", "abc-123", Stderr, false},
		{"k tty\n", "k", TTY, false},
		{"k1 stdio\n", "", "", true},
		{"k1\n", "", "", true},
		{"k1 stdin extra\n", "", "", true},
		{"k1 stdin", "", "", true}, // EOF before the newline
		{"\n", "", "", true},
		{strings.Repeat("x", 300) + " stdin\n", "", "", true},
	}
	for _, tt := range tests {
		key, stream, err := ReadPreamble(strings.NewReader(tt.in))
		if (err != nil) != tt.wantError || key != tt.key || stream != tt.stream {
			t.Errorf("ReadPreamble(%q) = %q, %q, %v", tt.in, key, stream, err)
		}
	}
}

// The bytes after the newline belong to the stream: none may be consumed.
func TestReadPreambleReadsNoFurther(t *testing.T) {
	r := strings.NewReader("k1 stdin\nhello")
	if _, _, err := ReadPreamble(iotest.OneByteReader(r)); err != nil {
		t.Fatal(err)
	}
	rest, _ := io.ReadAll(r)
	if string(rest) != "hello" {
		t.Errorf("left %q, want hello", rest)
	}
}

// dial parks one end of a pipe in h after writing the preamble.
func dial(t *testing.T, h *Hub, preamble string) net.Conn {
	t.Helper()
	host, guest := net.Pipe()
	t.Cleanup(func() { host.Close(); guest.Close() })
	errc := make(chan error, 1)
	go func() { errc <- h.Accept(guest) }()
	if _, err := io.WriteString(host, preamble); err != nil {
		t.Fatal(err)
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	return host
}

func TestClaimWaitsForAllStreams(t *testing.T) {
	h := NewHub(Config{})
	got := make(chan map[Stream]net.Conn, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		conns, err := h.Claim(ctx, "k", []Stream{Stdout, Stderr})
		if err != nil {
			t.Error(err)
		}
		got <- conns
	}()
	host := dial(t, h, "k stdout\n")
	dial(t, h, "other stderr\n")
	select {
	case <-got:
		t.Fatal("claim returned before its stderr arrived")
	case <-time.After(50 * time.Millisecond):
	}
	dial(t, h, "k stderr\n")
	conns := <-got
	if len(conns) != 2 {
		t.Fatalf("claimed %v", conns)
	}
	go io.WriteString(host, "payload")
	b := make([]byte, 7)
	if _, err := io.ReadFull(conns[Stdout], b); err != nil || string(b) != "payload" {
		t.Errorf("claimed stdout read %q, %v", b, err)
	}
	if n := h.Parked(); n != 1 {
		t.Errorf("parked %d, want the other key's 1", n)
	}
}

func TestClaimTimesOutNamingMissing(t *testing.T) {
	h := NewHub(Config{})
	dial(t, h, "k stdin\n")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Millisecond)
	defer cancel()
	_, err := h.Claim(ctx, "k", []Stream{Stdin, Stdout})
	if err == nil || !strings.Contains(err.Error(), "[stdout]") || !strings.Contains(err.Error(), "timed out") {
		t.Fatalf("err %v, want a timeout naming stdout", err)
	}
	if h.Parked() != 1 {
		t.Error("a failed claim took connections")
	}
}

func TestUnclaimedConnectionsClosed(t *testing.T) {
	h := NewHub(Config{ParkTimeout: 20 * time.Millisecond})
	host := dial(t, h, "k stdout\n")
	_ = host.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := host.Read(make([]byte, 1)); !errors.Is(err, io.EOF) {
		t.Fatalf("read from an expired parked connection: %v, want EOF", err)
	}
	if h.Parked() != 0 {
		t.Error("expired connection still parked")
	}
}

func TestDuplicateStreamRefused(t *testing.T) {
	h := NewHub(Config{})
	dial(t, h, "k stdout\n")
	host, guest := net.Pipe()
	defer host.Close()
	errc := make(chan error, 1)
	go func() { errc <- h.Accept(guest) }()
	io.WriteString(host, "k stdout\n")
	if err := <-errc; err == nil {
		t.Fatal("second stdout for the same key accepted")
	}
}

func TestSlowPreambleRefused(t *testing.T) {
	h := NewHub(Config{PreambleTimeout: 20 * time.Millisecond})
	host, guest := net.Pipe()
	defer host.Close()
	if err := h.Accept(guest); err == nil {
		t.Fatal("connection without a preamble accepted")
	}
}

func TestClaimWithoutStreams(t *testing.T) {
	h := NewHub(Config{})
	conns, err := h.Claim(context.Background(), "", nil)
	if err != nil || len(conns) != 0 {
		t.Fatalf("claim of nothing: %v %v", conns, err)
	}
	if _, err := h.Claim(context.Background(), "", []Stream{Stdout}); err == nil {
		t.Fatal("streams without a key accepted")
	}
}
