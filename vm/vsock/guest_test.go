package vsock

import (
	"errors"
	"io"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

// fakeGuest plays the guest's vsock driver against a muxer, with no virtqueues: it injects tx packets
// (header and payload in separate buffers, as Linux 6.1 does) and consumes rx packets into 4 KiB buffers.
// It checks what a guest would rely on: addressing, and that the device never sends beyond its credit.
type fakeGuest struct {
	t        *testing.T
	m        *muxer
	bufAlloc uint32

	txMu sync.Mutex // the device has one tx goroutine: packets reach the muxer one at a time

	mu        sync.Mutex
	socks     map[connKey]*guestSock // local = guest port, peer = host port
	listening map[uint32]chan *guestSock
	nextPort  uint32
	deaf      bool     // ignore REQUESTs, to exercise the connect timeout
	rsts      []Header // RSTs for sockets the guest does not know

	stop chan struct{}
	done chan struct{}
}

type guestSock struct {
	g   *fakeGuest
	key connKey

	mu           sync.Mutex
	cond         *sync.Cond
	established  bool
	reset        bool
	peerShut     uint32
	recv         []byte
	recvTotal    uint32
	fwdCnt       uint32
	advFwd       uint32
	peerBufAlloc uint32
	peerFwdCnt   uint32
	txCnt        uint32
	creditWaits  int // times Write found no credit
}

// testMuxerConfig is small enough that credit runs out in tests.
func testMuxerConfig(t *testing.T) muxerConfig {
	dir, err := os.MkdirTemp("", "vsk")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	cfg := defaultMuxerConfig(testCID, filepath.Join(dir, "v.sock"))
	cfg.conn = connParams{bufAlloc: 32 * 1024, creditThreshold: 8 * 1024, readChunk: 16 * 1024, killTimeout: 2 * time.Second}
	cfg.connectTimeout = 2 * time.Second
	cfg.handshakeTimeout = 2 * time.Second
	return cfg
}

func newTestMuxer(t *testing.T, cfg muxerConfig) *muxer {
	m, err := newMuxer(cfg, testLog())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := m.close(); err != nil {
			t.Error(err)
		}
	})
	return m
}

func newFakeGuest(t *testing.T, m *muxer) *fakeGuest {
	g := &fakeGuest{t: t, m: m, bufAlloc: 32 * 1024, socks: map[connKey]*guestSock{},
		listening: map[uint32]chan *guestSock{}, nextPort: 50000, stop: make(chan struct{}), done: make(chan struct{})}
	go g.rxLoop()
	t.Cleanup(func() { close(g.stop); <-g.done })
	return g
}

func (g *fakeGuest) rxLoop() {
	defer close(g.done)
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-g.stop:
			return
		case <-g.m.readyChan():
		case <-tick.C:
		}
		for g.m.hasRx() {
			bufs := [][]byte{make([]byte, HeaderSize), make([]byte, 4096)}
			n, err := g.m.fillRx(bufs)
			if err != nil {
				g.t.Errorf("fillRx: %v", err)
				return
			}
			if n == 0 {
				break
			}
			h, pay, err := decodePacket(bufs)
			if err != nil {
				g.t.Errorf("device sent a malformed packet: %v", err)
				continue
			}
			if h.SrcCID != HostCID || h.DstCID != testCID || uint32(n) != HeaderSize+h.Len {
				g.t.Errorf("device sent %+v in %d bytes", h, n)
			}
			payload := make([]byte, pay.size())
			pay.copyTo(payload)
			g.receive(h, payload)
		}
	}
}

// send injects a guest packet; s may be nil for packets outside any socket. The socket's lock is held while
// the packet reaches the muxer, so fwd_cnt never goes backwards between packets, as in a real driver.
// Callers must not hold s.mu.
func (g *fakeGuest) send(s *guestSock, h Header, payload []byte) {
	h.SrcCID, h.DstCID, h.Type, h.Len = testCID, HostCID, TypeStream, uint32(len(payload))
	if s != nil {
		s.mu.Lock()
		defer s.mu.Unlock()
		h.SrcPort, h.DstPort, h.BufAlloc, h.FwdCnt = s.key.local, s.key.peer, g.bufAlloc, s.fwdCnt
		s.advFwd = s.fwdCnt
	}
	b := make([]byte, HeaderSize)
	h.Encode(b)
	g.txMu.Lock()
	defer g.txMu.Unlock()
	g.m.handleTx([][]byte{b, payload})
}

func (g *fakeGuest) receive(h Header, payload []byte) {
	key := connKey{local: h.DstPort, peer: h.SrcPort}
	g.mu.Lock()
	s := g.socks[key]
	if s == nil {
		switch {
		case h.Op == OpRequest && !g.deaf && g.listening[h.DstPort] != nil:
			s = g.newSock(key)
			s.established = true
			accept := g.listening[h.DstPort]
			g.mu.Unlock()
			s.mu.Lock()
			s.peerBufAlloc, s.peerFwdCnt = h.BufAlloc, h.FwdCnt
			s.mu.Unlock()
			g.send(s, Header{Op: OpResponse}, nil)
			accept <- s
			return
		case h.Op == OpRequest && !g.deaf:
			g.mu.Unlock()
			g.send(nil, rstFor(&h), nil)
			return
		case h.Op == OpRst:
			g.rsts = append(g.rsts, h)
		}
		g.mu.Unlock()
		return
	}
	if h.Op == OpRst {
		delete(g.socks, key)
	}
	g.mu.Unlock()

	s.mu.Lock()
	creditAsked := false
	defer func() {
		s.cond.Broadcast()
		s.mu.Unlock()
		if creditAsked {
			g.send(s, Header{Op: OpCreditUpdate}, nil)
		}
	}()
	s.peerBufAlloc, s.peerFwdCnt = h.BufAlloc, h.FwdCnt
	switch h.Op {
	case OpResponse:
		s.established = true
	case OpRst:
		s.reset = true
	case OpShutdown:
		s.peerShut |= h.Flags
	case OpRW:
		s.recv = append(s.recv, payload...)
		s.recvTotal += uint32(len(payload))
		if inFlight := s.recvTotal - s.fwdCnt; inFlight > g.bufAlloc {
			g.t.Errorf("%v: device sent %d bytes beyond the guest's credit", key, inFlight-g.bufAlloc)
		}
	case OpCreditRequest:
		creditAsked = true
	}
}

func (g *fakeGuest) newSock(key connKey) *guestSock {
	s := &guestSock{g: g, key: key}
	s.cond = sync.NewCond(&s.mu)
	g.socks[key] = s
	return s
}

func (g *fakeGuest) listen(port uint32) <-chan *guestSock {
	ch := make(chan *guestSock, 128)
	g.mu.Lock()
	g.listening[port] = ch
	g.mu.Unlock()
	return ch
}

// connect opens a guest-initiated connection to host port.
func (g *fakeGuest) connect(port uint32) (*guestSock, error) {
	g.mu.Lock()
	g.nextPort++
	s := g.newSock(connKey{local: g.nextPort, peer: port})
	g.mu.Unlock()
	g.send(s, Header{Op: OpRequest}, nil)
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.waitLocked(func() bool { return s.established || s.reset }) {
		return nil, errors.New("no answer to REQUEST")
	}
	if s.reset {
		return nil, errors.New("connection reset")
	}
	return s, nil
}

// waitLocked waits for cond with a timeout, so a broken device fails the test instead of hanging it.
func (s *guestSock) waitLocked(cond func() bool) bool {
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			return false
		}
		t := time.AfterFunc(20*time.Millisecond, s.cond.Broadcast)
		s.cond.Wait()
		t.Stop()
	}
	return true
}

func (s *guestSock) peerFreeLocked() uint32 {
	inFlight := s.txCnt - s.peerFwdCnt
	if inFlight >= s.peerBufAlloc {
		return 0
	}
	return s.peerBufAlloc - inFlight
}

// Write sends p within the device's credit, as a guest driver must.
func (s *guestSock) Write(p []byte) (int, error) {
	done := 0
	for len(p) > 0 {
		s.mu.Lock()
		if s.peerFreeLocked() == 0 {
			s.creditWaits++
		}
		if !s.waitLocked(func() bool { return s.reset || s.peerFreeLocked() > 0 }) {
			s.mu.Unlock()
			return done, errors.New("no credit")
		}
		if s.reset {
			s.mu.Unlock()
			return done, errors.New("connection reset")
		}
		n := min(len(p), int(s.peerFreeLocked()), maxPayload)
		s.txCnt += uint32(n)
		s.mu.Unlock()
		s.g.send(s, Header{Op: OpRW}, p[:n])
		p, done = p[n:], done+n
	}
	return done, nil
}

// Read consumes received bytes and tells the device when a quarter of the buffer was freed.
func (s *guestSock) Read(p []byte) (int, error) {
	s.mu.Lock()
	if !s.waitLocked(func() bool { return len(s.recv) > 0 || s.reset || s.peerShut&ShutdownSend != 0 }) {
		s.mu.Unlock()
		return 0, errors.New("read timed out")
	}
	if len(s.recv) == 0 {
		defer s.mu.Unlock()
		if s.reset && s.peerShut&ShutdownSend == 0 {
			return 0, errors.New("connection reset")
		}
		return 0, io.EOF
	}
	n := copy(p, s.recv)
	s.recv = s.recv[n:]
	s.fwdCnt += uint32(n)
	update := s.fwdCnt-s.advFwd >= s.g.bufAlloc/4
	s.mu.Unlock()
	if update {
		s.g.send(s, Header{Op: OpCreditUpdate}, nil)
	}
	return n, nil
}

func (s *guestSock) shutdown(flags uint32) {
	s.g.send(s, Header{Op: OpShutdown, Flags: flags}, nil)
}

// Close shuts both directions and waits for the device's RST, as Linux does on close().
func (s *guestSock) Close() error {
	s.shutdown(shutdownBoth)
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.waitLocked(func() bool { return s.reset }) {
		return errors.New("no RST after full shutdown")
	}
	return nil
}
