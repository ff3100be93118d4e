package vsock

import (
	"bytes"
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"
)

// fakeOwner stands in for the muxer.
type fakeOwner struct {
	wakes    chan struct{}
	finished chan bool // rst
	// flushFirst makes finish close the connection as a guest's RST does, asking the writer to flush, as if the
	// RST had come before the finish.
	flushFirst bool
}

func newFakeOwner() *fakeOwner {
	return &fakeOwner{wakes: make(chan struct{}, 1), finished: make(chan bool, 4)}
}

func (o *fakeOwner) wake(*conn) {
	select {
	case o.wakes <- struct{}{}:
	default:
	}
}
func (o *fakeOwner) finish(c *conn, rst bool) {
	c.close(o.flushFirst)
	c.close(false)
	o.finished <- rst
}
func (o *fakeOwner) expire(c *conn) { o.finish(c, true) }

func testLog() *logrus.Entry {
	l := logrus.New()
	l.SetOutput(io.Discard)
	return logrus.NewEntry(l)
}

// socketPair returns two connected Unix stream sockets.
func socketPair(t *testing.T) (*net.UnixConn, *net.UnixConn) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conv := func(fd int) *net.UnixConn {
		f := os.NewFile(uintptr(fd), "sp")
		defer f.Close()
		c, err := net.FileConn(f)
		if err != nil {
			t.Fatal(err)
		}
		return c.(*net.UnixConn)
	}
	a, b := conv(fds[0]), conv(fds[1])
	t.Cleanup(func() { a.Close(); b.Close() })
	return a, b
}

var testParams = connParams{bufAlloc: 4096, creditThreshold: 1024, readChunk: 1500, killTimeout: time.Second}

// establishedConn returns a guest-initiated connection in the established state, its host peer socket and
// its owner. The guest advertised peerBufAlloc.
func establishedConn(t *testing.T, peerBufAlloc uint32) (*conn, *net.UnixConn, *fakeOwner) {
	t.Helper()
	return establishedConnWith(t, testParams, peerBufAlloc)
}

// establishedConnWith is establishedConn with connection parameters p.
func establishedConnWith(t *testing.T, p connParams, peerBufAlloc uint32) (*conn, *net.UnixConn, *fakeOwner) {
	t.Helper()
	o := newFakeOwner()
	var wg sync.WaitGroup
	c := newConn(connKey{local: 1024, peer: 5000}, stateDialing, testCID, p, o, &wg, testLog())
	h := testHeader(OpRequest, 0)
	h.BufAlloc, h.FwdCnt = peerBufAlloc, 0
	c.setPeerCreditLocked(&h)
	ours, theirs := socketPair(t)
	if !c.establish(ours) {
		t.Fatal("establish failed")
	}
	t.Cleanup(func() { c.close(false); wg.Wait() })
	mustEmit(t, c, OpResponse)
	return c, theirs, o
}

// emitAll drains every packet the connection has ready into 4 KiB rx buffers.
func emitAll(c *conn) []rxPacket {
	var out []rxPacket
	for {
		bufs := [][]byte{make([]byte, HeaderSize), make([]byte, 4096)}
		ok, _ := c.emit(newScatter(bufs))
		if !ok {
			return out
		}
		h, _ := DecodeHeader(bufs[0])
		out = append(out, rxPacket{h, append([]byte(nil), bufs[1][:h.Len]...)})
	}
}

type rxPacket struct {
	Header
	payload []byte
}

func mustEmit(t *testing.T, c *conn, op Op) rxPacket {
	t.Helper()
	bufs := [][]byte{make([]byte, HeaderSize), make([]byte, 4096)}
	ok, _ := c.emit(newScatter(bufs))
	h, _ := DecodeHeader(bufs[0])
	if !ok || h.Op != op {
		t.Fatalf("emit = %v %v, want %v", ok, h.Op, op)
	}
	return rxPacket{h, append([]byte(nil), bufs[1][:h.Len]...)}
}

func TestPeerFree(t *testing.T) {
	tests := []struct {
		name                 string
		bufAlloc, fwd, txCnt uint32
		want                 uint32
	}{
		{"fresh", 1000, 0, 0, 1000},
		{"some in flight", 1000, 100, 400, 700},
		{"full", 1000, 0, 1000, 0},
		{"counters wrapped", 1000, 0xffffff00, 0x00000010, 1000 - 0x110},
		{"buffer shrank below in flight", 100, 0, 500, 0},
		{"no buffer", 0, 0, 0, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := &conn{peerBufAlloc: tt.bufAlloc, peerFwdCnt: tt.fwd, txCnt: tt.txCnt}
			if got := c.peerFreeLocked(); got != tt.want {
				t.Fatalf("peerFree = %d, want %d", got, tt.want)
			}
		})
	}
}

// TestHostDataNeverExceedsGuestCredit pins that host->guest bytes stop at the guest's buf_alloc and resume
// only when the guest reports consumption.
func TestHostDataNeverExceedsGuestCredit(t *testing.T) {
	const guestBuf = 2500 // not a multiple of readChunk, so reads must be cut to credit
	c, host, _ := establishedConn(t, guestBuf)
	data := bytes.Repeat([]byte("0123456789"), 1000) // 10000 bytes
	go host.Write(data)

	var got []byte
	fwd := uint32(0)
	deadline := time.Now().Add(5 * time.Second)
	for len(got) < len(data) && time.Now().Before(deadline) {
		// Take all the device sends before consuming anything, so it has every chance to overrun.
		for quiet := time.Now().Add(30 * time.Millisecond); time.Now().Before(quiet); time.Sleep(time.Millisecond) {
			for _, p := range emitAll(c) {
				if p.Op != OpRW {
					continue
				}
				got = append(got, p.payload...)
				if inFlight := uint32(len(got)) - fwd; inFlight > guestBuf {
					t.Fatalf("%d bytes in flight, guest credit is %d", inFlight, guestBuf)
				}
			}
		}
		// The guest consumes everything, then tells us.
		fwd = uint32(len(got))
		h := testHeader(OpCreditUpdate, 0)
		h.BufAlloc, h.FwdCnt = guestBuf, fwd
		c.handle(&h, nil)
	}
	if !bytes.Equal(got, data) {
		t.Fatalf("guest got %d bytes, want %d", len(got), len(data))
	}
}

func TestCreditUpdateThreshold(t *testing.T) {
	c, host, o := establishedConn(t, 1<<16)
	send := func(n int) {
		h := testHeader(OpRW, n)
		h.BufAlloc = 1 << 16
		if _, end := c.handle(&h, iovec{make([]byte, n)}); end != endNone {
			t.Fatalf("RW of %d bytes ended the connection", n)
		}
		if _, err := io.ReadFull(host, make([]byte, n)); err != nil {
			t.Fatal(err)
		}
	}
	// Below the threshold: consumption is not advertised on its own.
	send(int(testParams.creditThreshold) - 1)
	time.Sleep(50 * time.Millisecond)
	if p := emitAll(c); len(p) != 0 {
		t.Fatalf("emitted %v below the threshold", p[0].Op)
	}
	// One more byte reaches it.
	send(1)
	select {
	case <-o.wakes:
	case <-time.After(5 * time.Second):
		t.Fatal("no wake after consuming the threshold")
	}
	p := mustEmit(t, c, OpCreditUpdate)
	if p.FwdCnt != testParams.creditThreshold || p.BufAlloc != testParams.bufAlloc {
		t.Fatalf("CREDIT_UPDATE fwd_cnt %d buf_alloc %d, want %d %d", p.FwdCnt, p.BufAlloc,
			testParams.creditThreshold, testParams.bufAlloc)
	}
}

// TestDefaultCreditUpdatesAreLazy pins the default credit policy: a guest streaming full packets is told of the
// host's consumption once per buf_alloc less one packet, not once per packet, and always before it has sent all
// its credit, so it never waits for an update while the host has consumed its bytes. The guest's own buffer is
// as large as ours, as the agent's stdio sockets are.
func TestDefaultCreditUpdatesAreLazy(t *testing.T) {
	p := defaultMuxerConfig(testCID, "unused").conn
	if p.creditThreshold > p.bufAlloc-maxPayload {
		t.Fatalf("credit threshold %d leaves the guest less than one %d-byte packet of its %d-byte credit",
			p.creditThreshold, maxPayload, p.bufAlloc)
	}
	guestBuffer := p.bufAlloc
	c, host, _ := establishedConnWith(t, p, guestBuffer)
	var updates []uint32 // fwd_cnt of each CREDIT_UPDATE
	sent := uint32(0)
	for sent+maxPayload <= p.bufAlloc {
		h := testHeader(OpRW, maxPayload)
		h.BufAlloc = guestBuffer
		if _, end := c.handle(&h, iovec{make([]byte, maxPayload)}); end != endNone {
			t.Fatalf("RW of %d bytes after %d ended the connection", maxPayload, sent)
		}
		sent += maxPayload
		if _, err := io.ReadFull(host, make([]byte, maxPayload)); err != nil {
			t.Fatal(err)
		}
		// The writer counts bytes as forwarded once its write returned, just after the host read them.
		deadline := time.Now().Add(5 * time.Second)
		for {
			c.mu.Lock()
			fwd := c.fwdCnt
			c.mu.Unlock()
			if fwd == sent {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("forwarded %d bytes, want %d", fwd, sent)
			}
			time.Sleep(time.Millisecond)
		}
		for _, pkt := range emitAll(c) {
			if pkt.Op == OpCreditUpdate {
				updates = append(updates, pkt.FwdCnt)
			}
		}
	}
	if len(updates) != 1 || updates[0] < p.creditThreshold || updates[0] > p.bufAlloc-maxPayload {
		t.Fatalf("after %d bytes in %d-byte packets, CREDIT_UPDATEs at fwd_cnt %v; want one, by fwd_cnt %d",
			sent, maxPayload, updates, p.bufAlloc-maxPayload)
	}
}

// TestCreditKeepsAGuestsWindowOpen streams from a guest that, as Linux does since 6.1.192, never has more
// unacknowledged bytes in flight than the smaller of our buf_alloc and its own, and waits for the host's fwd_cnt
// once that window is full. Whatever its buffer, the host must tell it of its consumption before it waits for
// good. With a threshold taken from our buf_alloc alone, a guest socket with a buffer smaller than that less one
// packet stalled for ever.
func TestCreditKeepsAGuestsWindowOpen(t *testing.T) {
	p := defaultMuxerConfig(testCID, "unused").conn
	tests := []struct {
		name        string
		guestBuffer uint32
		maxUpdates  int // CREDIT_UPDATEs allowed for 1 MiB
	}{
		{"the agent's stdio buffer, as large as ours", 1 << 20, 1},
		{"Linux's default buffer", 256 << 10, 6},
		{"a 64 KiB buffer", 64 << 10, 16},
		{"a buffer smaller than a packet", 16 << 10, 64},
		{"one page", 4096, 256},
	}
	const total = 1 << 20
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, host, _ := establishedConnWith(t, p, tt.guestBuffer)
			go io.Copy(io.Discard, host)
			window := min(p.bufAlloc, tt.guestBuffer)
			sent, peerFwd, updates := uint32(0), uint32(0), 0
			for sent < total {
				if credit := window - (sent - peerFwd); credit > 0 {
					n := min(credit, maxPayload, total-sent)
					h := testHeader(OpRW, int(n))
					h.BufAlloc = tt.guestBuffer
					if _, end := c.handle(&h, iovec{make([]byte, n)}); end != endNone {
						t.Fatalf("RW of %d bytes after %d ended the connection", n, sent)
					}
					sent += n
					continue
				}
				// The window is full: wait, as the guest does, for a packet carrying the host's fwd_cnt.
				deadline := time.Now().Add(5 * time.Second)
				for peerFwd == sent-window {
					for _, pkt := range emitAll(c) {
						peerFwd = pkt.FwdCnt
						if pkt.Op == OpCreditUpdate {
							updates++
						}
					}
					if time.Now().After(deadline) {
						t.Fatalf("the guest's %d-byte window is full after %d bytes and the host advertised fwd_cnt %d: no CREDIT_UPDATE came",
							window, sent, peerFwd)
					}
					time.Sleep(time.Millisecond)
				}
			}
			if updates > tt.maxUpdates {
				t.Fatalf("%d CREDIT_UPDATEs for %d bytes through a %d-byte window, want at most %d", updates, total, window, tt.maxUpdates)
			}
		})
	}
}

func TestCreditRequestIsAnswered(t *testing.T) {
	c, _, _ := establishedConn(t, 1<<16)
	h := testHeader(OpCreditRequest, 0)
	if wake, end := c.handle(&h, nil); !wake || end != endNone {
		t.Fatalf("handle = %v %v, want wake", wake, end)
	}
	p := mustEmit(t, c, OpCreditUpdate)
	if p.BufAlloc != testParams.bufAlloc || p.FwdCnt != 0 {
		t.Fatalf("CREDIT_UPDATE %+v", p.Header)
	}
}

// TestGuestOverrunningCreditIsReset pins that buffered guest data is bounded by our buf_alloc: a guest that
// sends past it is reset instead of buffered.
func TestGuestOverrunningCreditIsReset(t *testing.T) {
	c, _, _ := establishedConn(t, 1<<16)
	// Nobody reads the host socket, so the ring fills: at most bufAlloc bytes, plus what the socket holds.
	total, reset := 0, false
	for range 10000 {
		h := testHeader(OpRW, 1000)
		if _, end := c.handle(&h, iovec{make([]byte, 1000)}); end == endReset {
			reset = true
			break
		}
		total += 1000
		if c.buffered() > int(testParams.bufAlloc) {
			t.Fatalf("buffered %d bytes over buf_alloc %d", c.buffered(), testParams.bufAlloc)
		}
	}
	if !reset {
		t.Fatalf("guest sent %d bytes without credit and was not reset", total)
	}
}

func TestStateTransitions(t *testing.T) {
	tests := []struct {
		from, to connState
		ok       bool
	}{
		{stateConnecting, stateEstablished, true},
		{stateConnecting, stateClosing, false},
		{stateDialing, stateEstablished, true},
		{stateEstablished, stateClosing, true},
		{stateEstablished, stateConnecting, false},
		{stateClosing, stateEstablished, false},
		{stateClosing, stateClosed, true},
		{stateClosed, stateEstablished, false},
	}
	for _, tt := range tests {
		t.Run(tt.from.String()+"->"+tt.to.String(), func(t *testing.T) {
			c := &conn{state: tt.from}
			if err := c.transitionLocked(tt.to); (err == nil) != tt.ok {
				t.Fatalf("transition err = %v, want ok=%v", err, tt.ok)
			}
		})
	}
}

// TestHalfCloseBothWays pins the SHUTDOWN mapping: guest SEND becomes EOF on the host socket, host EOF becomes
// SHUTDOWN(SEND) to the guest, and with both directions done the connection ends with a RST.
func TestHalfCloseBothWays(t *testing.T) {
	c, host, o := establishedConn(t, 1<<16)
	h := testHeader(OpRW, 5)
	c.handle(&h, iovec{[]byte("hello")})
	h = testHeader(OpShutdown, 0)
	h.Flags = ShutdownSend
	c.handle(&h, nil)
	got, err := io.ReadAll(host)
	if err != nil || string(got) != "hello" {
		t.Fatalf("host read %q, %v; want hello then EOF", got, err)
	}
	if _, err := host.Write([]byte("bye")); err != nil {
		t.Fatal(err)
	}
	host.CloseWrite()
	var pkts []rxPacket
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); {
		pkts = append(pkts, emitAll(c)...)
		if n := len(pkts); n > 0 && pkts[n-1].Op == OpShutdown {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	if n := len(pkts); n < 2 || string(pkts[n-2].payload) != "bye" || pkts[n-1].Flags != ShutdownSend {
		t.Fatalf("guest got %+v, want RW(bye) then SHUTDOWN(SEND)", pkts)
	}
	select {
	case rst := <-o.finished:
		if !rst {
			t.Fatal("connection finished without RST")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("connection did not finish after both directions shut down")
	}
}

// A host socket whose write failed is closed, even when a guest's RST closed the connection between the failed
// write and the writer's finish, asking the writer to flush what the guest sent: the writer is the one that
// closes then, and a host peer would otherwise wait for EOF until the socket was collected.
func TestFailedWriteClosesTheHostSocket(t *testing.T) {
	c, host, o := establishedConn(t, 1<<16)
	o.flushFirst = true
	_ = host.Close()
	h := testHeader(OpRW, 5)
	c.handle(&h, iovec{[]byte("hello")})
	select {
	case <-o.finished:
	case <-time.After(5 * time.Second):
		t.Fatal("the connection did not finish after its host write failed")
	}
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		if err := c.host.SetWriteDeadline(time.Time{}); errors.Is(err, net.ErrClosed) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the host socket is still open")
		}
	}
}

// buffered is how many guest bytes wait for the host.
func (c *conn) buffered() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.tx.n
}
