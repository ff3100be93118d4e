package vsock

import (
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"
)

// connKey names a connection by its two ports; every connection runs between the guest CID and the host.
type connKey struct {
	local uint32 // host-side port
	peer  uint32 // guest port
}

func (k connKey) String() string { return fmt.Sprintf("host:%d<->guest:%d", k.local, k.peer) }

// connParams are the per-connection limits, fixed at creation.
type connParams struct {
	bufAlloc        uint32 // our receive buffer: guest->host bytes buffered at most
	creditThreshold uint32 // consumed bytes not yet advertised that trigger a CREDIT_UPDATE
	readChunk       int    // host->guest bytes read from the socket at once
	// killTimeout bounds how long a closing connection may take to drain to the host, and how long a guest may
	// stay silent on a connection whose host socket is gone before it is reset.
	killTimeout time.Duration
}

// connOwner is what a connection needs from the muxer. All are called without the connection's lock held.
type connOwner interface {
	wake(c *conn)             // c has guest-bound packets to send
	finish(c *conn, rst bool) // c is over: forget it and, if rst, reset the guest side
	expire(c *conn)           // a timeout ran out on c: forget it and reset the guest side
}

// ending says how a guest packet ends a connection.
type ending int

const (
	endNone      ending = iota
	endReset            // protocol violation: reset the guest side, drop buffered data
	endPeerReset        // the guest reset: deliver what is buffered to the host, send nothing
)

// conn is one vsock stream between a guest port and a host Unix socket. A reader goroutine moves host bytes
// into pending (bounded by the guest's credit) and a writer goroutine drains the guest's bytes from tx to the
// host socket; packets for the guest are produced by emit, called from the device's rx path.
type conn struct {
	key      connKey
	guestCID uint64
	p        connParams
	owner    connOwner
	wg       *sync.WaitGroup // the muxer's, so closing the device waits for the goroutines
	log      *logrus.Entry

	mu       sync.Mutex
	cond     *sync.Cond // on mu: wakes the reader and the writer
	state    connState
	host     *net.UnixConn // nil until dialed (guest-initiated)
	greeting []byte        // written to host before any guest byte ("OK <port>\n" for host-initiated)
	running  bool          // reader and writer started
	flushing bool          // closed, but the writer still drains tx to the host
	// timer is the connect timeout (connecting), the host watch (established) or the kill timeout (closing).
	timer *time.Timer
	// guestPackets counts the guest's packets; watchedPackets is its value at the last host watch, so the
	// watch can tell a silent guest from a slow one. hostGoneSeen: a watch found the host socket gone.
	guestPackets, watchedPackets uint64
	hostGoneSeen                 bool

	wantRequest, wantResponse, wantCredit bool

	// host -> guest
	rbuf         []byte // reader-owned while pending is empty
	pending      []byte // read from the host, not yet sent to the guest
	shutWant     uint32 // SHUTDOWN flags we owe the guest
	shutSent     uint32
	txCnt        uint32 // bytes sent to the guest (free-running)
	peerBufAlloc uint32
	peerFwdCnt   uint32

	// guest -> host
	tx            ring
	fwdCnt        uint32 // bytes written to the host socket (free-running)
	advFwdCnt     uint32 // fwdCnt as last advertised to the guest
	guestShut     uint32 // SHUTDOWN flags received from the guest
	hostWriteShut bool
}

func newConn(key connKey, state connState, guestCID uint64, p connParams, owner connOwner, wg *sync.WaitGroup, log *logrus.Entry) *conn {
	c := &conn{key: key, guestCID: guestCID, p: p, owner: owner, wg: wg, state: state,
		log: log.WithField("vsock_conn", key.String())}
	c.cond = sync.NewCond(&c.mu)
	c.tx.limit = int(p.bufAlloc)
	return c
}

// peerFreeLocked is how many more bytes the guest can take: its buf_alloc minus what is in flight.
func (c *conn) peerFreeLocked() uint32 {
	inFlight := c.txCnt - c.peerFwdCnt
	if inFlight >= c.peerBufAlloc {
		return 0
	}
	return c.peerBufAlloc - inFlight
}

func (c *conn) setPeerCreditLocked(h *Header) {
	c.peerBufAlloc, c.peerFwdCnt = h.BufAlloc, h.FwdCnt
}

// creditDueLocked says whether the host has consumed enough of the guest's bytes, unadvertised, to send a
// CREDIT_UPDATE on its own: one packet short of the window the guest may fill (p.creditThreshold at most). The
// window is our buf_alloc, or the guest's own buf_alloc when that is smaller: Linux caps its send credit at its
// own receive buffer (the guest kernel Kiln builds does, 6.1.192), so a guest socket with a small buffer fills
// its window and waits, and a threshold taken from our buf_alloc alone would never be reached.
func (c *conn) creditDueLocked() bool {
	window := min(c.p.bufAlloc, c.peerBufAlloc)
	threshold := min(c.p.creditThreshold, window-min(window/2, maxPayload))
	consumed := c.fwdCnt - c.advFwdCnt
	return consumed > 0 && consumed >= threshold
}

// startLocked moves the connection to established with host as its Unix side and starts the goroutines.
func (c *conn) startLocked(host *net.UnixConn, greeting []byte) error {
	if err := c.transitionLocked(stateEstablished); err != nil {
		return err
	}
	c.stopTimerLocked()
	c.host, c.greeting, c.running = host, greeting, true
	c.rbuf = make([]byte, c.p.readChunk)
	c.watchedPackets = c.guestPackets
	c.timer = time.AfterFunc(c.p.killTimeout, c.watchHost)
	c.wg.Go(c.readLoop)
	c.wg.Go(c.writeLoop)
	return nil
}

// watchHost runs every killTimeout while the connection is established. It resets a connection whose host
// socket is gone (the host client closed it: both directions shut) once the guest sent nothing for a whole
// killTimeout after a watch saw it gone. The guest was told with SHUTDOWN, or would be once it takes the bytes
// still pending; one that never answers would otherwise hold the connection, and a slot of maxConns, until the
// VM ends. Linux resets a peer that does not answer its close() within a timeout in the same way, and
// Firecracker's kill queue does too. A host that only half-closed (stdin's EOF) still reads, so its connection
// lives however quiet the guest is.
func (c *conn) watchHost() {
	c.mu.Lock()
	if c.state != stateEstablished {
		// Closed, or closing under its own kill timer.
		c.mu.Unlock()
		return
	}
	silent := c.hostGoneSeen && c.guestPackets == c.watchedPackets
	c.watchedPackets = c.guestPackets
	if !silent {
		c.hostGoneSeen = c.hostGoneSeen || hostGone(c.host)
		c.timer = time.AfterFunc(c.p.killTimeout, c.watchHost)
		c.mu.Unlock()
		return
	}
	c.timer = nil
	c.mu.Unlock()
	c.log.Debug("host socket closed and the guest stayed silent: resetting the connection")
	c.owner.expire(c)
}

// hostGone says whether a Unix stream socket can neither receive nor send any more: poll reports POLLHUP once
// both directions are shut, which the peer's close does (a peer's half-close shuts only one).
func hostGone(s *net.UnixConn) bool {
	rc, err := s.SyscallConn()
	if err != nil {
		return true // already closed on our side
	}
	gone := false
	cerr := rc.Control(func(fd uintptr) {
		p := []unix.PollFd{{Fd: int32(fd)}}
		if n, err := unix.Poll(p, 0); err == nil && n > 0 && p[0].Revents&unix.POLLHUP != 0 {
			gone = true
		}
	})
	return gone || cerr != nil
}

// establish completes a guest-initiated connection once its host socket is dialed. It returns false when the
// connection was closed meanwhile; the caller then owns host.
func (c *conn) establish(host *net.UnixConn) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := c.startLocked(host, nil); err != nil {
		return false
	}
	c.wantResponse = true
	return true
}

// armTimer runs f after d unless the connection changes state first.
func (c *conn) armTimer(d time.Duration, f func()) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.stopTimerLocked()
	c.timer = time.AfterFunc(d, f)
}

func (c *conn) stopTimerLocked() {
	if c.timer != nil {
		c.timer.Stop()
		c.timer = nil
	}
}

func (c *conn) stateIs(s connState) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.state == s
}

// handle applies one guest packet addressed to this connection.
func (c *conn) handle(h *Header, payload iovec) (wake bool, end ending) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.state == stateClosed {
		return false, endNone
	}
	c.guestPackets++
	if h.Op == OpRst {
		return false, endPeerReset
	}
	// Every packet carries the sender's credit; a fresher view may unblock data we hold back. A guest that
	// shrank its buffer may now wait for consumption we have not advertised.
	c.setPeerCreditLocked(h)
	c.cond.Broadcast() // the reader may be waiting for credit
	if c.state != stateClosed && c.creditDueLocked() {
		c.wantCredit = true
	}
	switch h.Op {
	case OpResponse:
		if c.state != stateConnecting || c.wantRequest {
			// A RESPONSE before our REQUEST went out answers nothing we asked.
			c.log.Debugf("RESPONSE while %s (request sent: %v)", c.state, !c.wantRequest)
			return false, endReset
		}
		if err := c.startLocked(c.host, c.greeting); err != nil {
			c.log.WithError(err).Warn("start connection")
			return false, endReset
		}
	case OpRW:
		if (c.state != stateEstablished && c.state != stateClosing) || c.guestShut&ShutdownSend != 0 {
			c.log.Debugf("RW while %s, guest shutdown %#x", c.state, c.guestShut)
			return false, endReset
		}
		n := payload.size()
		if n > c.tx.free() {
			// The guest ignored the credit we advertised; buffering it would make memory unbounded.
			c.log.Debugf("guest sent %d bytes with %d bytes of credit", n, c.tx.free())
			return false, endReset
		}
		c.tx.write(payload)
		c.cond.Broadcast()
	case OpCreditUpdate:
	case OpCreditRequest:
		c.wantCredit = true
	case OpShutdown:
		if c.state != stateEstablished && c.state != stateClosing {
			return false, endReset
		}
		f := h.Flags & shutdownBoth
		fresh := f &^ c.guestShut
		c.guestShut |= f
		if fresh&ShutdownRcv != 0 {
			// Host bytes not yet sent are discarded; the host writer sees EPIPE from now on.
			c.pending = nil
			_ = c.host.CloseRead()
		}
		if c.guestShut == shutdownBoth && c.state == stateEstablished {
			_ = c.transitionLocked(stateClosing)
			c.stopTimerLocked() // the host watch: the kill timeout bounds what is left
			c.timer = time.AfterFunc(c.p.killTimeout, func() {
				c.log.Debug("closing connection did not drain in time")
				c.owner.expire(c)
			})
		}
		c.cond.Broadcast()
	default:
		return false, endReset
	}
	return c.hasWorkLocked(), endNone
}

func (c *conn) canSendDataLocked() bool {
	return len(c.pending) > 0 && c.guestShut&ShutdownRcv == 0 && c.peerFreeLocked() > 0
}

func (c *conn) hasWorkLocked() bool {
	if c.state == stateClosed {
		return false
	}
	return c.wantRequest || c.wantResponse || c.wantCredit || c.canSendDataLocked() ||
		(c.shutWant&^c.shutSent != 0 && len(c.pending) == 0)
}

// emit writes this connection's next guest-bound packet into dst. more says whether another is waiting.
func (c *conn) emit(dst *scatter) (ok, more bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.state == stateClosed {
		return false, false
	}
	h := Header{SrcCID: HostCID, DstCID: c.guestCID, SrcPort: c.key.local, DstPort: c.key.peer,
		Type: TypeStream, BufAlloc: c.p.bufAlloc, FwdCnt: c.fwdCnt}
	var payload []byte
	switch {
	case c.wantRequest:
		h.Op = OpRequest
	case c.wantResponse:
		h.Op = OpResponse
	case c.canSendDataLocked() && dst.room() > HeaderSize:
		n := min(len(c.pending), int(c.peerFreeLocked()), dst.room()-HeaderSize, maxPayload)
		h.Op, payload = OpRW, c.pending[:n]
	case c.wantCredit:
		h.Op = OpCreditUpdate
	case c.shutWant&^c.shutSent != 0 && len(c.pending) == 0:
		h.Op, h.Flags = OpShutdown, c.shutWant
	default:
		return false, false
	}
	if !writePacket(dst, h, payload) {
		return false, c.hasWorkLocked()
	}
	switch h.Op {
	case OpRequest:
		c.wantRequest = false
	case OpResponse:
		c.wantResponse = false
	case OpRW:
		c.txCnt += uint32(len(payload))
		c.pending = c.pending[len(payload):]
		if len(c.pending) == 0 {
			c.cond.Broadcast() // the reader may refill
		}
	case OpShutdown:
		c.shutSent = c.shutWant
		c.cond.Broadcast() // the writer may now be done
	}
	// Every packet advertises fwd_cnt, so none needs a separate CREDIT_UPDATE until more is consumed.
	c.advFwdCnt, c.wantCredit = c.fwdCnt, false
	return true, c.hasWorkLocked()
}

// readLoop moves host bytes towards the guest, never reading more than the guest's credit allows: a guest
// that does not read stops us reading, and the host writer blocks on its socket.
func (c *conn) readLoop() {
	for {
		c.mu.Lock()
		for c.state != stateClosed && c.guestShut&ShutdownRcv == 0 && (len(c.pending) > 0 || c.peerFreeLocked() == 0) {
			c.cond.Wait()
		}
		if c.state == stateClosed || c.guestShut&ShutdownRcv != 0 {
			c.mu.Unlock()
			return
		}
		buf := c.rbuf[:min(len(c.rbuf), int(c.peerFreeLocked()))]
		c.mu.Unlock()

		n, err := c.host.Read(buf)

		c.mu.Lock()
		live := c.state != stateClosed && c.guestShut&ShutdownRcv == 0
		if n > 0 && live {
			c.pending = buf[:n]
		}
		if err != nil && live {
			if !errors.Is(err, io.EOF) {
				c.log.WithError(err).Debug("read host socket")
			}
			c.shutWant |= ShutdownSend
		}
		wake := c.hasWorkLocked()
		c.mu.Unlock()
		if wake {
			c.owner.wake(c)
		}
		if err != nil {
			return
		}
	}
}

// doneLocked says whether both directions are finished, so the connection can end with a RST.
func (c *conn) doneLocked() bool {
	if c.tx.n > 0 || c.state == stateClosed || c.guestShut&ShutdownSend == 0 {
		return false
	}
	return c.guestShut&ShutdownRcv != 0 || c.shutSent&ShutdownSend != 0
}

// writeLoop drains the guest's bytes to the host socket. Only what it has written counts as forwarded, so a
// slow host reader holds back the guest's credit.
func (c *conn) writeLoop() {
	if len(c.greeting) > 0 {
		if _, err := c.host.Write(c.greeting); err != nil {
			c.log.WithError(err).Debug("write greeting to host client")
			c.owner.finish(c, true)
			// A close that came first asked this writer to flush and close (a guest's RST): it is done.
			_ = c.host.Close()
			return
		}
	}
	for {
		c.mu.Lock()
		for c.tx.n == 0 && c.state != stateClosed && !c.doneLocked() &&
			(c.guestShut&ShutdownSend == 0 || c.hostWriteShut) {
			c.cond.Wait()
		}
		if c.tx.n == 0 || (c.state == stateClosed && !c.flushing) {
			switch {
			case c.state == stateClosed:
				c.mu.Unlock()
				_ = c.host.Close()
				return
			case c.guestShut&ShutdownSend != 0 && !c.hostWriteShut:
				c.hostWriteShut = true
				_ = c.host.CloseWrite()
			}
			done := c.doneLocked()
			c.mu.Unlock()
			if done {
				c.owner.finish(c, true)
				return
			}
			continue
		}
		chunk := c.tx.peek()
		c.mu.Unlock()

		n, err := c.host.Write(chunk)

		c.mu.Lock()
		c.tx.consume(n)
		c.fwdCnt += uint32(n)
		wake := false
		if c.state != stateClosed && !c.wantCredit && c.creditDueLocked() {
			c.wantCredit, wake = true, true
		}
		closed := c.state == stateClosed
		c.mu.Unlock()
		if err != nil {
			c.log.WithError(err).Debug("write host socket")
			if !closed {
				c.owner.finish(c, true)
			}
			// Whoever closed the connection, a close that asked this writer to flush (a guest's RST, between
			// the failed write and the finish) left the socket to it.
			_ = c.host.Close()
			return
		}
		if wake {
			c.owner.wake(c)
		}
	}
}

// close ends the connection's host side. With flush, bytes the guest already sent are still delivered to the
// host (bounded by the kill timeout), as a socket's receive queue survives a reset.
func (c *conn) close(flush bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.state == stateClosed {
		return
	}
	c.state = stateClosed
	c.stopTimerLocked()
	c.pending = nil
	if c.host == nil {
		return
	}
	if c.running && flush && c.tx.n > 0 {
		c.flushing = true
		_ = c.host.SetWriteDeadline(time.Now().Add(c.p.killTimeout))
		_ = c.host.CloseRead()
	} else {
		_ = c.host.Close()
	}
	c.cond.Broadcast()
}
