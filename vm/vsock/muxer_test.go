package vsock

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"strings"
	"sync"
	"testing"
	"time"
)

func dialCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func accept(t *testing.T, ch <-chan *guestSock) *guestSock {
	t.Helper()
	select {
	case s := <-ch:
		return s
	case <-time.After(10 * time.Second):
		t.Fatal("guest accepted nothing")
		return nil
	}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); !cond(); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}

func (m *muxer) numConns() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.conns)
}

func TestHostInitiatedConnectDataClose(t *testing.T) {
	m := newTestMuxer(t, testMuxerConfig(t))
	g := newFakeGuest(t, m)
	accepted := g.listen(1024)

	// Raw handshake, to see the OK line and that bytes right after it are not lost.
	host, err := net.Dial("unix", m.cfg.udsPath)
	if err != nil {
		t.Fatal(err)
	}
	defer host.Close()
	fmt.Fprintf(host, "CONNECT 1024\n")
	gs := accept(t, accepted)
	line, err := readLine(host)
	if err != nil {
		t.Fatal(err)
	}
	if want := fmt.Sprintf("OK %d", gs.key.peer); line != want || gs.key.peer < hostPortFirst {
		t.Fatalf("handshake answer %q, want %q (host port >= %d)", line, want, hostPortFirst)
	}

	if _, err := gs.Write([]byte("from guest")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 64)
	if n, err := io.ReadAtLeast(host, buf, len("from guest")); err != nil || string(buf[:n]) != "from guest" {
		t.Fatalf("host read %q, %v", buf[:n], err)
	}
	fmt.Fprint(host, "from host")
	if n, err := io.ReadAtLeast(gs, buf, len("from host")); err != nil || string(buf[:n]) != "from host" {
		t.Fatalf("guest read %q, %v", buf[:n], err)
	}

	// Host closes: the guest sees EOF, closes in turn and gets the RST that ends the connection.
	host.Close()
	if n, err := gs.Read(buf); err != io.EOF {
		t.Fatalf("guest read after host close: %d, %v; want EOF", n, err)
	}
	if err := gs.Close(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "connection to be forgotten", func() bool { return m.numConns() == 0 })
}

func TestDialRefusedWhenGuestDoesNotListen(t *testing.T) {
	m := newTestMuxer(t, testMuxerConfig(t))
	newFakeGuest(t, m)
	if c, err := Dial(dialCtx(t), m.cfg.udsPath, 999); err == nil {
		c.Close()
		t.Fatal("Dial succeeded to a port nobody listens on")
	}
	waitFor(t, "connection to be forgotten", func() bool { return m.numConns() == 0 })
}

func TestDialTimesOutWhenGuestIsSilent(t *testing.T) {
	cfg := testMuxerConfig(t)
	cfg.connectTimeout = 200 * time.Millisecond
	m := newTestMuxer(t, cfg)
	g := newFakeGuest(t, m)
	g.deaf = true
	start := time.Now()
	if c, err := Dial(dialCtx(t), m.cfg.udsPath, 1024); err == nil {
		c.Close()
		t.Fatal("Dial succeeded with a silent guest")
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("Dial took %v with a 200ms connect timeout", d)
	}
	// The guest is told to forget the REQUEST it may have seen late.
	waitFor(t, "RST after the timeout", func() bool {
		g.mu.Lock()
		defer g.mu.Unlock()
		return len(g.rsts) == 1 && g.rsts[0].DstPort == 1024
	})
}

func TestBadConnectLineClosesClient(t *testing.T) {
	m := newTestMuxer(t, testMuxerConfig(t))
	for _, line := range []string{"HELLO 1\n", "CONNECT x\n", "CONNECT 99999999999\n", strings.Repeat("A", 100)} {
		c, err := net.Dial("unix", m.cfg.udsPath)
		if err != nil {
			t.Fatal(err)
		}
		fmt.Fprint(c, line)
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		// EOF, or a reset when the device closed with our bytes unread; never an answer.
		if n, err := c.Read(make([]byte, 10)); n != 0 || err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
			t.Errorf("%q: read %d, %v; want the connection closed", line, n, err)
		}
		c.Close()
	}
}

// hostListen serves "<UDSPath>_<port>" with handle for each connection. Cleanup closes what is still open,
// so a stalled connection fails the test instead of hanging it.
func hostListen(t *testing.T, m *muxer, port uint32, handle func(net.Conn)) {
	l, err := net.Listen("unix", fmt.Sprintf("%s_%d", m.cfg.udsPath, port))
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	open := map[net.Conn]bool{}
	closed := false
	t.Cleanup(func() {
		l.Close()
		mu.Lock()
		closed = true
		for c := range open {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	wg.Go(func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			if closed {
				// Accepted as the cleanup closed the others: its handler would wait for it for good.
				mu.Unlock()
				c.Close()
				return
			}
			open[c] = true
			mu.Unlock()
			wg.Go(func() {
				defer func() {
					mu.Lock()
					delete(open, c)
					mu.Unlock()
					c.Close()
				}()
				handle(c)
			})
		}
	})
}

func TestGuestInitiatedConnect(t *testing.T) {
	m := newTestMuxer(t, testMuxerConfig(t))
	g := newFakeGuest(t, m)
	got := make(chan string, 1)
	hostListen(t, m, 1234, func(c net.Conn) {
		b, _ := io.ReadAll(c) // until the guest's SHUTDOWN(SEND)
		got <- string(b)
		fmt.Fprint(c, "reply")
	})
	s, err := g.connect(1234)
	if err != nil {
		t.Fatal(err)
	}
	s.Write([]byte("request"))
	s.shutdown(ShutdownSend)
	if b := <-got; b != "request" {
		t.Fatalf("host got %q", b)
	}
	b, err := io.ReadAll(s)
	if err != nil || string(b) != "reply" {
		t.Fatalf("guest read %q, %v", b, err)
	}
	// Both directions are done: the device ends the connection on its own.
	s.mu.Lock()
	reset := s.waitLocked(func() bool { return s.reset })
	s.mu.Unlock()
	if !reset {
		t.Fatal("no RST once both directions were shut down")
	}
	waitFor(t, "connection to be forgotten", func() bool { return m.numConns() == 0 })
}

func TestGuestConnectToNothingIsReset(t *testing.T) {
	m := newTestMuxer(t, testMuxerConfig(t))
	g := newFakeGuest(t, m)
	if _, err := g.connect(4321); err == nil || !strings.Contains(err.Error(), "reset") {
		t.Fatalf("connect to a host port nobody serves: %v, want reset", err)
	}
	waitFor(t, "connection to be forgotten", func() bool { return m.numConns() == 0 })
}

func TestUnknownAndMalformedPackets(t *testing.T) {
	tests := []struct {
		name    string
		mutate  func(*Header)
		payload []byte
		wantRST bool
	}{
		{"RW to unknown connection", func(h *Header) { h.Op = OpRW }, []byte("x"), true},
		{"SHUTDOWN to unknown connection", func(h *Header) { h.Op = OpShutdown }, nil, true},
		{"CREDIT_REQUEST to unknown connection", func(h *Header) { h.Op = OpCreditRequest }, nil, true},
		{"RST to unknown connection", func(h *Header) { h.Op = OpRst }, nil, false},
		{"seqpacket REQUEST", func(h *Header) { h.Op, h.Type = OpRequest, 2 }, nil, true},
		{"unknown op", func(h *Header) { h.Op = 9 }, nil, true},
		{"to another CID", func(h *Header) { h.Op, h.DstCID = OpRequest, 7 }, nil, true},
		{"spoofed source CID", func(h *Header) { h.Op, h.SrcCID = OpRW, 3 }, []byte("x"), false},
		{"len beyond descriptor", func(h *Header) { h.Op, h.Len = OpRW, 10 }, []byte("x"), true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := newTestMuxer(t, testMuxerConfig(t))
			h := Header{SrcCID: testCID, DstCID: HostCID, SrcPort: 777, DstPort: 888, Type: TypeStream,
				Len: uint32(len(tt.payload))}
			tt.mutate(&h)
			b := make([]byte, HeaderSize)
			h.Encode(b)
			m.handleTx([][]byte{b, tt.payload})
			bufs := [][]byte{make([]byte, HeaderSize+4096)}
			n, err := m.fillRx(bufs)
			if err != nil {
				t.Fatal(err)
			}
			if !tt.wantRST {
				if n != 0 {
					t.Fatalf("device answered with %d bytes", n)
				}
				return
			}
			rst, _ := DecodeHeader(bufs[0])
			want := Header{SrcCID: h.DstCID, DstCID: h.SrcCID, SrcPort: 888, DstPort: 777, Type: TypeStream, Op: OpRst}
			if n != HeaderSize || rst != want {
				t.Fatalf("answer %+v (%d bytes), want %+v", rst, n, want)
			}
			if m.numConns() != 0 {
				t.Fatal("a connection was created")
			}
		})
	}
}

// TestSlowHostReader pins backpressure guest->host: the guest keeps sending, the host reads slowly; the
// device holds at most buf_alloc per connection, the guest waits for credit, and nothing is lost.
func TestSlowHostReader(t *testing.T) {
	cfg := testMuxerConfig(t)
	m := newTestMuxer(t, cfg)
	g := newFakeGuest(t, m)
	const size = 1 << 20
	data := randomBytes(3, size)
	got := make(chan []byte, 1)
	hostListen(t, m, 1234, func(c net.Conn) {
		var b []byte
		chunk := make([]byte, 4096)
		for {
			time.Sleep(200 * time.Microsecond)
			n, err := c.Read(chunk)
			b = append(b, chunk[:n]...)
			if err != nil {
				break
			}
		}
		got <- b
	})
	s, err := g.connect(1234)
	if err != nil {
		t.Fatal(err)
	}
	var maxBuffered int
	stop := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		for {
			select {
			case <-stop:
				return
			case <-time.After(time.Millisecond):
				maxBuffered = max(maxBuffered, m.buffered())
			}
		}
	}()
	if _, err := s.Write(data); err != nil {
		t.Fatal(err)
	}
	s.shutdown(ShutdownSend)
	b := <-got
	close(stop)
	<-sampled
	if !bytes.Equal(b, data) {
		t.Fatalf("host got %d bytes, want %d identical", len(b), len(data))
	}
	if maxBuffered > int(cfg.conn.bufAlloc) {
		t.Fatalf("device buffered %d bytes, more than buf_alloc %d", maxBuffered, cfg.conn.bufAlloc)
	}
	if s.creditWaits == 0 {
		t.Fatal("the guest never ran out of credit: the test did not exercise backpressure")
	}
	t.Logf("max buffered %d, guest waited for credit %d times", maxBuffered, s.creditWaits)
}

// TestSlowGuestReader pins backpressure host->guest: the host writes fast, the guest reads slowly; the guest
// harness fails the test if the device sends beyond its credit.
func TestSlowGuestReader(t *testing.T) {
	m := newTestMuxer(t, testMuxerConfig(t))
	g := newFakeGuest(t, m)
	accepted := g.listen(1024)
	host, err := Dial(dialCtx(t), m.cfg.udsPath, 1024)
	if err != nil {
		t.Fatal(err)
	}
	defer host.Close()
	gs := accept(t, accepted)
	const size = 1 << 20
	data := randomBytes(5, size)
	go func() {
		host.Write(data)
		host.(*net.UnixConn).CloseWrite()
	}()
	var b []byte
	chunk := make([]byte, 3000)
	for {
		time.Sleep(100 * time.Microsecond)
		n, err := gs.Read(chunk)
		b = append(b, chunk[:n]...)
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	if !bytes.Equal(b, data) {
		t.Fatalf("guest got %d bytes, want %d identical", len(b), len(data))
	}
}

// TestConcurrentConnections runs 64 connections at once, half from each side, each echoing a checksummed
// random payload.
func TestConcurrentConnections(t *testing.T) {
	m := newTestMuxer(t, testMuxerConfig(t))
	g := newFakeGuest(t, m)
	const perSide, size = 32, 96 * 1024
	echo := func(rw io.ReadWriter) {
		buf := make([]byte, 8192)
		for total := 0; total < size; {
			n, err := rw.Read(buf)
			if _, werr := rw.Write(buf[:n]); werr != nil {
				return
			}
			total += n
			if err != nil {
				return
			}
		}
	}
	accepted := g.listen(1024)
	go func() {
		for s := range accepted {
			go echo(s)
		}
	}()
	hostListen(t, m, 2048, func(c net.Conn) { echo(c) })

	check := func(i int, rw io.ReadWriter) error {
		data := randomBytes(uint64(i)+100, size)
		want := sha256.Sum256(data)
		errc := make(chan error, 1)
		go func() { _, err := rw.Write(data); errc <- err }()
		got := make([]byte, size)
		if _, err := io.ReadFull(rw, got); err != nil {
			return fmt.Errorf("connection %d: read echo: %w", i, err)
		}
		if err := <-errc; err != nil {
			return fmt.Errorf("connection %d: write: %w", i, err)
		}
		if sha256.Sum256(got) != want {
			return fmt.Errorf("connection %d: checksum mismatch", i)
		}
		return nil
	}
	var wg sync.WaitGroup
	errs := make(chan error, 2*perSide)
	for i := range perSide {
		wg.Go(func() {
			c, err := Dial(dialCtx(t), m.cfg.udsPath, 1024)
			if err != nil {
				errs <- err
				return
			}
			defer c.Close()
			errs <- check(i, c)
		})
		wg.Go(func() {
			s, err := g.connect(2048)
			if err != nil {
				errs <- err
				return
			}
			errs <- check(perSide+i, s)
			s.Close()
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
}

func randomBytes(seed uint64, n int) []byte {
	b := make([]byte, n)
	rand.NewChaCha8([32]byte{byte(seed), byte(seed >> 8)}).Read(b)
	return b
}

// buffered is the guest bytes held for host sockets, over all connections.
func (m *muxer) buffered() int {
	m.mu.Lock()
	conns := make([]*conn, 0, len(m.conns))
	for _, c := range m.conns {
		conns = append(conns, c)
	}
	m.mu.Unlock()
	n := 0
	for _, c := range conns {
		n += c.buffered()
	}
	return n
}

// TestResponseBeforeRequestIsReset: a guest that answers a host connection before the device has sent it the
// REQUEST (the host's ports are handed out in order, so it can guess one) gets a reset, not an established
// connection.
func TestResponseBeforeRequestIsReset(t *testing.T) {
	m := newTestMuxer(t, testMuxerConfig(t)) // no guest drains rx: the REQUEST stays unsent
	c, err := net.Dial("unix", m.cfg.udsPath)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprint(c, "CONNECT 1024\n")
	waitFor(t, "the connection to be made", func() bool { return m.numConns() == 1 })
	h := Header{SrcCID: testCID, DstCID: HostCID, SrcPort: 1024, DstPort: hostPortFirst, Type: TypeStream,
		Op: OpResponse, BufAlloc: 32 * 1024}
	b := make([]byte, HeaderSize)
	h.Encode(b)
	m.handleTx([][]byte{b})
	waitFor(t, "the connection to be reset", func() bool { return m.numConns() == 0 })
	if n := m.stats.snapshot().ConnsViolated; n != 1 {
		t.Errorf("ConnsViolated = %d, want 1", n)
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := c.Read(make([]byte, 64)); n != 0 || err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("host client read %d, %v; want the connection closed without an answer", n, err)
	}
}
