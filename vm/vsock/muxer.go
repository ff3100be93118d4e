package vsock

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sirupsen/logrus"
)

// Host-side ports handed to host-initiated connections. They start high so they do not collide with the
// service ports guests connect to.
const (
	hostPortFirst = 1 << 30
	hostPortLast  = 1<<31 - 1
)

var errRxChainTooSmall = errors.New("rx descriptor chain cannot hold a vsock header")

// muxerConfig holds the muxer's limits; tests shorten the timeouts.
type muxerConfig struct {
	guestCID         uint64
	udsPath          string
	conn             connParams
	handshakeTimeout time.Duration // a host client must send its CONNECT line within this
	connectTimeout   time.Duration // the guest must answer a host-initiated REQUEST within this
	dialTimeout      time.Duration // dialing "<udsPath>_<port>" for a guest-initiated connection
	maxConns         int           // connections beyond this are refused (RST / client closed)
	maxCtl           int           // RSTs not tied to a live connection waiting for an rx buffer; more are dropped
}

// defaultBufAlloc is each connection's receive buffer: guest bytes the host side holds at most, and so the window
// a guest may have in flight. Linux caps a socket's send window at its own buffer as well (256 KiB unless the
// socket asks for more), so a guest stream fills this one only if its socket is as large, as the agent's stdio
// sockets are (agent/stdio.SocketBuffer). With 1 MiB against 256 KiB, a container's stdout under TCG, its
// 1 MiB pipe drained by the agent into the stream, moved about 15% more (docs/fast-start-log.md, session 28). The
// host's buffer for a connection grows with its backlog (ring), so a larger window costs nothing while the host
// side keeps up.
const defaultBufAlloc = 1 << 20

func defaultMuxerConfig(guestCID uint64, udsPath string) muxerConfig {
	return muxerConfig{
		guestCID: guestCID,
		udsPath:  udsPath,
		conn: connParams{
			bufAlloc: defaultBufAlloc,
			// Consumption is advertised on its own only once the guest, not knowing of it, would have less than
			// one full packet of credit left, as Linux's virtio transport does for its peer. Every packet to the
			// guest carries fwd_cnt anyway; a CREDIT_UPDATE per 64 KiB cost the guest an interrupt and a pass
			// through its rx path for every packet it sent, which under TCG took a third of stdout's throughput.
			creditThreshold: defaultBufAlloc - maxPayload,
			readChunk:       64 * 1024,
			killTimeout:     10 * time.Second,
		},
		handshakeTimeout: 10 * time.Second,
		// A guest still booting under TCG may take seconds before its agent listens.
		connectTimeout: 10 * time.Second,
		dialTimeout:    5 * time.Second,
		maxConns:       1024,
		maxCtl:         1024,
	}
}

// muxer maps (host port, guest port) to connections, accepts host clients on the hybrid socket, dials host
// sockets for the guest, and queues guest-bound packets until the device has rx buffers for them.
type muxer struct {
	cfg    muxerConfig
	log    *logrus.Entry
	ln     *net.UnixListener
	ctx    context.Context // cancelled by close: aborts dials
	cancel context.CancelFunc
	wg     sync.WaitGroup // accept loop, handshakes, dials, connection goroutines
	ready  chan struct{}  // capacity 1: a guest-bound packet was queued
	stats  counters

	mu          sync.Mutex
	closed      bool
	conns       map[connKey]*conn
	rxq         []*conn        // live connections with guest-bound packets, served in turn; at most maxConns
	queued      map[*conn]bool // members of rxq
	ctl         []Header       // RSTs not tied to a live connection, at most cfg.maxCtl
	nextPort    uint32
	handshaking map[net.Conn]struct{}
}

// newMuxer listens on cfg.udsPath and starts accepting host clients.
func newMuxer(cfg muxerConfig, log *logrus.Entry) (*muxer, error) {
	// A socket left by a crashed run would make Listen fail; anything else at the path is not ours to remove.
	if fi, err := os.Lstat(cfg.udsPath); err == nil && fi.Mode()&os.ModeSocket != 0 {
		_ = os.Remove(cfg.udsPath)
	}
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: cfg.udsPath, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("listen on hybrid vsock socket %s: %w", cfg.udsPath, err)
	}
	// close removes the path itself, after the listener is gone.
	ln.SetUnlinkOnClose(false)
	ctx, cancel := context.WithCancel(context.Background())
	m := &muxer{cfg: cfg, log: log, ln: ln, ctx: ctx, cancel: cancel, ready: make(chan struct{}, 1),
		conns: map[connKey]*conn{}, queued: map[*conn]bool{}, nextPort: hostPortFirst,
		handshaking: map[net.Conn]struct{}{}}
	m.wg.Go(m.acceptLoop)
	return m, nil
}

func (m *muxer) acceptLoop() {
	for {
		nc, err := m.ln.AcceptUnix()
		if err != nil {
			if !errors.Is(err, net.ErrClosed) {
				m.log.WithError(err).Error("accept on hybrid vsock socket")
			}
			return
		}
		m.mu.Lock()
		if m.closed {
			m.mu.Unlock()
			_ = nc.Close()
			return
		}
		m.handshaking[nc] = struct{}{}
		m.mu.Unlock()
		m.wg.Go(func() { m.hostConnect(nc) })
	}
}

// hostConnect reads a host client's CONNECT line and asks the guest for the connection.
func (m *muxer) hostConnect(nc *net.UnixConn) {
	_ = nc.SetReadDeadline(time.Now().Add(m.cfg.handshakeTimeout))
	line, err := readLine(nc)
	_ = nc.SetReadDeadline(time.Time{})
	var port uint32
	if err == nil {
		port, err = parseLine(line, "CONNECT")
	}
	m.mu.Lock()
	delete(m.handshaking, nc)
	if err == nil && (m.closed || len(m.conns) >= m.cfg.maxConns) {
		err = errors.New("device closed or too many connections")
	}
	if err != nil {
		m.mu.Unlock()
		m.log.WithError(err).Debug("host client handshake")
		_ = nc.Close()
		return
	}
	key := connKey{local: m.allocPortLocked(port), peer: port}
	c := newConn(key, stateConnecting, m.cfg.guestCID, m.cfg.conn, m, &m.wg, m.log)
	c.host, c.greeting = nc, []byte("OK "+strconv.FormatUint(uint64(key.local), 10)+"\n")
	c.wantRequest = true
	// Armed before the guest can see the connection: a RESPONSE the guest sends at once (it can guess the port)
	// starts the established connection's own timer, which this one must not replace.
	c.armTimer(m.cfg.connectTimeout, func() {
		if c.stateIs(stateConnecting) {
			c.log.Debug("guest did not answer the connection request in time")
			m.expire(c)
		}
	})
	m.conns[key] = c
	m.mu.Unlock()
	m.wake(c)
}

func (m *muxer) allocPortLocked(peer uint32) uint32 {
	for {
		p := m.nextPort
		m.nextPort++
		if m.nextPort >= hostPortLast {
			m.nextPort = hostPortFirst
		}
		if _, busy := m.conns[connKey{local: p, peer: peer}]; !busy {
			return p
		}
	}
}

// handleTx takes one driver-written packet from the tx queue. It never blocks on a host socket.
func (m *muxer) handleTx(bufs [][]byte) {
	h, payload, err := decodePacket(bufs)
	if err == nil {
		err = h.checkAddress(m.cfg.guestCID)
	}
	if err != nil {
		m.rejectTx(&h, err)
		return
	}
	key := connKey{local: h.DstPort, peer: h.SrcPort}
	m.mu.Lock()
	c := m.conns[key]
	if h.Op == OpRequest {
		if c != nil {
			// The guest reuses the pair, so it has forgotten the old connection.
			delete(m.conns, key)
			m.unqueueLocked(c)
			defer c.close(false)
		}
		m.guestConnectLocked(&h, key)
		m.mu.Unlock()
		return
	}
	m.mu.Unlock()
	if c == nil {
		if h.Op != OpRst {
			m.reply(rstFor(&h))
		}
		return
	}
	wake, end := c.handle(&h, payload)
	switch end {
	case endReset:
		m.stats.connsViolated.Add(1)
		m.retire(c, true, false)
	case endPeerReset:
		m.retire(c, false, true)
	}
	if wake {
		m.wake(c)
	}
}

// rejectTx answers a malformed packet: dropped when it cannot be trusted to name the guest's socket, reset
// otherwise, so the guest socket fails instead of waiting forever.
func (m *muxer) rejectTx(h *Header, err error) {
	m.log.WithError(err).Debug("malformed vsock packet from the guest")
	switch {
	case errors.Is(err, ErrShortHeader), errors.Is(err, ErrBadSourceCID), h.Op == OpRst:
		return
	case !errors.Is(err, ErrBadDestCID):
		// The packet names one of our connections, which cannot go on (stream bytes may be lost).
		m.mu.Lock()
		c := m.conns[connKey{local: h.DstPort, peer: h.SrcPort}]
		m.mu.Unlock()
		if c != nil {
			m.retire(c, true, false)
			return
		}
	}
	m.reply(rstFor(h))
}

// rstFor builds the RST answering h, from whatever address h was sent to.
func rstFor(h *Header) Header {
	return Header{SrcCID: h.DstCID, DstCID: h.SrcCID, SrcPort: h.DstPort, DstPort: h.SrcPort,
		Type: TypeStream, Op: OpRst}
}

// guestConnectLocked starts a guest-initiated connection to host port h.DstPort.
func (m *muxer) guestConnectLocked(h *Header, key connKey) {
	if m.closed || len(m.conns) >= m.cfg.maxConns {
		m.replyLocked(rstFor(h))
		return
	}
	c := newConn(key, stateDialing, m.cfg.guestCID, m.cfg.conn, m, &m.wg, m.log)
	c.setPeerCreditLocked(h) // not yet shared with any goroutine
	m.conns[key] = c
	m.wg.Go(func() {
		path := m.cfg.udsPath + "_" + strconv.FormatUint(uint64(key.local), 10)
		d := net.Dialer{Timeout: m.cfg.dialTimeout}
		nc, err := d.DialContext(m.ctx, "unix", path)
		if err != nil {
			c.log.WithError(err).Debug("dial host socket for guest connection")
			m.finish(c, true)
			return
		}
		if !c.establish(nc.(*net.UnixConn)) {
			_ = nc.Close()
			return
		}
		m.wake(c)
	})
}

// reply queues a RST not tied to a live connection (replyLocked).
func (m *muxer) reply(h Header) {
	m.mu.Lock()
	m.replyLocked(h)
	m.mu.Unlock()
	m.signal()
}

// replyLocked queues a RST for the guest unless maxCtl already wait for rx buffers. Every RST the guest can
// provoke goes through here, those retiring a connection included: once retired, the connection no longer
// counts against maxConns, so a guest that dials unserved ports without posting rx buffers could otherwise
// queue RSTs without end. Dropping never blocks the tx path; it is counted. The guest loses little: its next
// packet on that port is answered with a fresh RST, and a connect it waits on times out on its side.
func (m *muxer) replyLocked(h Header) {
	if len(m.ctl) >= m.cfg.maxCtl {
		m.stats.rstDropped.Add(1)
		return
	}
	m.ctl = append(m.ctl, h)
}

// rstTo is the RST that resets the guest side of the connection named by key.
func (m *muxer) rstTo(key connKey) Header {
	return Header{SrcCID: HostCID, DstCID: m.cfg.guestCID, SrcPort: key.local, DstPort: key.peer,
		Type: TypeStream, Op: OpRst}
}

// wake queues c for the rx path (connOwner). A connection already retired is not queued: it has nothing more
// to send, and only live connections may wait in rxq, which keeps it within maxConns.
func (m *muxer) wake(c *conn) {
	m.mu.Lock()
	if m.conns[c.key] == c && !m.queued[c] {
		m.queued[c] = true
		m.rxq = append(m.rxq, c)
	}
	m.mu.Unlock()
	m.signal()
}

func (m *muxer) signal() {
	select {
	case m.ready <- struct{}{}:
	default:
	}
}

// finish ends c without flushing (connOwner).
func (m *muxer) finish(c *conn, rst bool) { m.retire(c, rst, false) }

// expire resets c because a timeout ran out, and counts it (connOwner).
func (m *muxer) expire(c *conn) { m.retireCounted(c, true, false, &m.stats.connsKilled) }

// retire forgets c, queues a RST for the guest if asked, and closes the host side.
func (m *muxer) retire(c *conn, rst, flush bool) { m.retireCounted(c, rst, flush, nil) }

// retireCounted is retire, counting c in counter (when not nil) if c was still one of the muxer's connections,
// before the guest can see its RST.
func (m *muxer) retireCounted(c *conn, rst, flush bool, counter *atomic.Uint64) {
	m.mu.Lock()
	live := m.conns[c.key] == c
	if live {
		if counter != nil {
			counter.Add(1)
		}
		delete(m.conns, c.key)
		m.unqueueLocked(c)
		if rst {
			m.replyLocked(m.rstTo(c.key))
		}
	}
	m.mu.Unlock()
	c.close(flush)
	if rst {
		m.signal()
	}
}

// unqueueLocked takes c out of rxq. Without it a guest that makes connections and ends them before taking their
// packets, posting no rx buffers, would pile dead connections (and their buffers) up in rxq.
func (m *muxer) unqueueLocked(c *conn) {
	if !m.queued[c] {
		return
	}
	delete(m.queued, c)
	for i, q := range m.rxq {
		if q == c {
			m.rxq = append(m.rxq[:i], m.rxq[i+1:]...)
			break
		}
	}
}

// readyChan receives a value after guest-bound packets are queued.
func (m *muxer) readyChan() <-chan struct{} { return m.ready }

// hasRx says whether guest-bound packets may be waiting.
func (m *muxer) hasRx() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.ctl) > 0 || len(m.rxq) > 0
}

// fillRx writes the next guest-bound packet into the device-writable buffers of an rx chain. It returns the
// bytes written, or 0 when nothing was ready after all.
func (m *muxer) fillRx(bufs [][]byte) (uint32, error) {
	dst := newScatter(bufs)
	// A chain with no room for payload could carry control packets but would stall data forever.
	if dst.room() <= HeaderSize {
		return 0, fmt.Errorf("%w: %d bytes", errRxChainTooSmall, dst.room())
	}
	m.mu.Lock()
	if len(m.ctl) > 0 {
		h := m.ctl[0]
		m.ctl = m.ctl[1:]
		m.mu.Unlock()
		writePacket(dst, h, nil)
		return uint32(dst.n), nil
	}
	for len(m.rxq) > 0 {
		c := m.rxq[0]
		m.rxq = m.rxq[1:]
		delete(m.queued, c)
		m.mu.Unlock()
		ok, more := c.emit(dst)
		if more {
			m.wake(c)
		}
		if ok {
			return uint32(dst.n), nil
		}
		m.mu.Lock()
	}
	m.mu.Unlock()
	return 0, nil
}

// close stops accepting, resets every connection and waits for every goroutine the muxer started.
func (m *muxer) close() error {
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return nil
	}
	m.closed = true
	conns := m.conns
	m.conns = map[connKey]*conn{}
	for key := range conns {
		m.replyLocked(m.rstTo(key))
	}
	for nc := range m.handshaking {
		_ = nc.Close()
	}
	m.mu.Unlock()
	err := m.ln.Close()
	m.cancel()
	for _, c := range conns {
		c.close(false)
	}
	m.wg.Wait()
	if rmErr := os.Remove(m.cfg.udsPath); rmErr != nil && !errors.Is(rmErr, os.ErrNotExist) {
		err = errors.Join(err, rmErr)
	}
	if err != nil {
		return fmt.Errorf("close hybrid vsock socket %s: %w", m.cfg.udsPath, err)
	}
	return nil
}
