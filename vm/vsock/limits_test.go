package vsock

import (
	"io"
	"net"
	"testing"
)

// ctlQueued is how many RSTs wait for an rx buffer.
func (m *muxer) ctlQueued() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.ctl)
}

// TestResetQueueIsBoundedWhenGuestPostsNoRxBuffers pins finding 3 of issue 11: a guest that provokes RSTs
// without ever giving the device an rx buffer to put them in gets at most maxCtl of them queued; the rest are
// dropped, and the tx path never waits for room.
func TestResetQueueIsBoundedWhenGuestPostsNoRxBuffers(t *testing.T) {
	const sent, maxCtl = 5000, 16
	tests := []struct {
		name   string
		packet func(i int) Header
	}{
		// Each REQUEST is dialed, fails and retires its connection with a RST (or is refused with one while
		// maxConns are dialing).
		{"REQUEST to a host port nobody serves", func(i int) Header {
			return Header{Op: OpRequest, SrcPort: uint32(10000 + i), DstPort: 4321, BufAlloc: 4096}
		}},
		{"RW to an unknown connection", func(i int) Header {
			return Header{Op: OpRW, SrcPort: uint32(10000 + i), DstPort: 4321}
		}},
		{"unknown op to an unknown connection", func(i int) Header {
			return Header{Op: 99, SrcPort: uint32(10000 + i), DstPort: 4321}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := testMuxerConfig(t)
			cfg.maxCtl = maxCtl
			m := newTestMuxer(t, cfg)
			// No guest: nothing ever drains the rx side.
			for i := range sent {
				m.handleTx(guestPacket(tt.packet(i), nil))
			}
			waitFor(t, "every dial to end", func() bool { return m.numConns() == 0 })
			if n := m.ctlQueued(); n > maxCtl {
				t.Fatalf("%d RSTs queued for a guest that reads nothing, want at most maxCtl=%d", n, maxCtl)
			}
			// Each packet provoked one RST: those not queued are counted.
			if got, want := m.stats.snapshot().RstDropped, uint64(sent-m.ctlQueued()); got != want {
				t.Fatalf("RstDropped = %d, want %d", got, want)
			}
		})
	}
}

// TestRetiredConnectionsLeaveTheRxQueue pins a bound FuzzMuxerTx found beside finding 3 of issue 11: a
// connection that ends while it waits in the rx queue leaves it, so a guest that makes and resets connections
// without posting rx buffers cannot pile up dead connections (and their buffers) there.
func TestRetiredConnectionsLeaveTheRxQueue(t *testing.T) {
	const made = 200
	tests := []struct {
		name  string
		reuse bool                        // every connection comes from the same guest port
		end   func(m *muxer, port uint32) // nil: the next REQUEST replaces the connection
	}{
		{"guest resets", false, func(m *muxer, port uint32) {
			m.handleTx(guestPacket(Header{Op: OpRst, SrcPort: port, DstPort: 1234}, nil))
		}},
		{"guest breaks the protocol", false, func(m *muxer, port uint32) {
			m.handleTx(guestPacket(Header{Op: OpResponse, SrcPort: port, DstPort: 1234}, nil))
		}},
		{"guest reuses its port", true, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := testMuxerConfig(t)
			cfg.maxConns = 8
			m := newTestMuxer(t, cfg)
			hostListen(t, m, 1234, func(c net.Conn) { io.Copy(io.Discard, c) })
			for i := range made {
				port := uint32(10000 + i)
				if tt.reuse {
					port = 10000
				}
				m.handleTx(guestPacket(Header{Op: OpRequest, SrcPort: port, DstPort: 1234, BufAlloc: 4096}, nil))
				// Established: its RESPONSE waits in the rx queue, which nobody drains.
				waitFor(t, "connection to be established", func() bool {
					m.mu.Lock()
					defer m.mu.Unlock()
					return m.queued[m.conns[connKey{local: 1234, peer: port}]]
				})
				if tt.end != nil {
					tt.end(m, port)
				}
			}
			m.mu.Lock()
			rxq, queued := len(m.rxq), len(m.queued)
			m.mu.Unlock()
			if rxq > cfg.maxConns || queued > cfg.maxConns {
				t.Fatalf("rx queue holds %d connections (%d marked) after %d were made and ended, want at most maxConns=%d",
					rxq, queued, made, cfg.maxConns)
			}
		})
	}
}
