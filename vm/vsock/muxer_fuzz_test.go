package vsock

import (
	"context"
	"net"
	"testing"
	"time"
)

// Fuzz ports: host port 1 is served by a host socket that never reads, 3 by one that reads everything, answers
// and closes; 2 is served by nobody. The guest listens on nothing, so host clients dialing it are refused or
// time out unless the fuzzer answers their REQUEST.
const (
	fuzzPortStalled = 1
	fuzzPortNobody  = 2
	fuzzPortAnswer  = 3
)

// fuzzMuxerConfig is small enough for the fuzzer to reach every limit within a few packets.
func fuzzMuxerConfig(t *testing.T) muxerConfig {
	cfg := testMuxerConfig(t)
	cfg.conn = connParams{bufAlloc: 1024, creditThreshold: 256, readChunk: 512, killTimeout: 30 * time.Millisecond}
	cfg.handshakeTimeout = 30 * time.Millisecond
	cfg.connectTimeout = 30 * time.Millisecond
	cfg.dialTimeout = 30 * time.Millisecond
	cfg.maxConns = 4
	cfg.maxCtl = 4
	return cfg
}

// fuzzStep encodings; each step takes fuzzStepLen bytes of the input.
const (
	stepPacket = iota // b1 op, b2 source port, b3 destination port index, b4 flags, b5 buf_alloc, b6 fwd_cnt, b7 payload length, b8 oddities
	stepDrain         // b1 packets to take, b2 rx buffer size
	stepHost          // b1 what the host does
	stepKinds
	fuzzStepLen = 9
	// fuzzMaxSteps bounds one input's run, sleeps included, so the fuzzer spends its time on new inputs.
	fuzzMaxSteps = 200
)

// FuzzMuxerTx feeds the muxer arbitrary guest packets interleaved with rx draining and host activity, and
// checks after every step that what a guest can make the host hold stays bounded: queued RSTs by maxCtl,
// connections (and the rx queue) by maxConns, guest bytes by buf_alloc per connection; and that a packet for no
// connection is answered with a RST or, when maxCtl RSTs already wait, counted as dropped.
func FuzzMuxerTx(f *testing.F) {
	for _, seed := range fuzzSeeds() {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		cfg := fuzzMuxerConfig(t)
		m := newTestMuxer(t, cfg)
		fuzzHostPorts(t, m)
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		// Host ports the guest may address: the fixed ones, then those the device used towards the guest.
		ports := []uint32{fuzzPortStalled, fuzzPortNobody, fuzzPortAnswer, 1024}
		for steps := 0; len(data) >= fuzzStepLen && steps < fuzzMaxSteps; data, steps = data[fuzzStepLen:], steps+1 {
			b := data[:fuzzStepLen]
			switch b[0] % stepKinds {
			case stepPacket:
				bufs := fuzzPacket(b[1:], ports)
				checkRst := unknownGuestPort(m, bufs[0])
				before, dropped := ctlAndDropped(m)
				m.handleTx(bufs)
				if after, nowDropped := ctlAndDropped(m); checkRst && after <= before && nowDropped <= dropped {
					t.Fatalf("packet %x for no connection was neither answered with a RST nor counted as dropped "+
						"(RSTs queued %d -> %d, dropped %d -> %d)", bufs[0], before, after, dropped, nowDropped)
				}
			case stepDrain:
				for range b[1] % 8 {
					bufs := [][]byte{make([]byte, HeaderSize+1+int(b[2])*8)}
					n, err := m.fillRx(bufs)
					if err != nil || n == 0 {
						break
					}
					if rh, err := DecodeHeader(bufs[0]); err == nil && len(ports) < 64 {
						ports = append(ports, rh.SrcPort)
					}
				}
			case stepHost:
				switch b[1] % 3 {
				case 0: // a host client dials guest port 1024 and hangs up soon after
					dctx, dcancel := context.WithTimeout(ctx, 50*time.Millisecond)
					go func() {
						defer dcancel()
						if c, err := Dial(dctx, cfg.udsPath, 1024); err == nil {
							c.Close()
						}
					}()
				case 1: // let the muxer's goroutines and timers run
					time.Sleep(time.Duration(b[2]%4) * time.Millisecond)
				}
			}
			checkMuxerBounds(t, m)
		}
	})
}

// fuzzPacket builds a guest packet from b: b0 op, b1 source port, b2 destination port index into ports, b3 flags,
// b4 buf_alloc, b5 fwd_cnt, b6 payload length, b7 oddities (seqpacket type, another destination CID, a length
// past the buffers). The header and the payload come in two buffers, as Linux sends them.
func fuzzPacket(b []byte, ports []uint32) [][]byte {
	h := Header{SrcCID: testCID, DstCID: HostCID, Type: TypeStream, Op: Op(b[0] % 9),
		SrcPort: 1000 + uint32(b[1]%4), DstPort: ports[int(b[2])%len(ports)], Flags: uint32(b[3] % 4),
		BufAlloc: uint32(b[4]) << 4, FwdCnt: uint32(b[5]) << 4}
	var payload []byte
	if h.Op == OpRW {
		payload = make([]byte, int(b[6])*4)
		for i := range payload {
			payload[i] = byte(i) ^ b[6]
		}
	}
	h.Len = uint32(len(payload))
	if b[7]&1 != 0 {
		h.Type = 2
	}
	if b[7]&2 != 0 {
		h.DstCID = 42
	}
	if b[7]&4 != 0 {
		h.Len += 7 // longer than the buffers
	}
	hb := make([]byte, HeaderSize)
	h.Encode(hb)
	return [][]byte{hb, payload}
}

// unknownGuestPort says whether hdr is a packet, neither REQUEST nor RST, for a service port (below the ports
// the host hands out, so only the guest's own packets create connections there) with no connection: the muxer
// must answer it with a RST, or count the RST as dropped.
func unknownGuestPort(m *muxer, hdr []byte) bool {
	h, _ := DecodeHeader(hdr)
	if h.Op == OpRequest || h.Op == OpRst || h.DstPort >= hostPortFirst {
		return false
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.conns[connKey{local: h.DstPort, peer: h.SrcPort}] == nil
}

// ctlAndDropped returns the RSTs queued and the count of those dropped.
func ctlAndDropped(m *muxer) (queued int, dropped uint64) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.ctl), m.stats.rstDropped.Load()
}

// checkMuxerBounds fails t when the muxer holds more than its limits allow.
func checkMuxerBounds(t *testing.T, m *muxer) {
	t.Helper()
	m.mu.Lock()
	ctl, conns, rxq := len(m.ctl), len(m.conns), len(m.rxq)
	live := make([]*conn, 0, conns)
	for _, c := range m.conns {
		live = append(live, c)
	}
	dead := 0
	for _, c := range m.rxq {
		if m.conns[c.key] != c {
			dead++
		}
	}
	m.mu.Unlock()
	if dead > 0 {
		t.Fatalf("%d retired connections still in the rx queue", dead)
	}
	if ctl > m.cfg.maxCtl {
		t.Fatalf("%d RSTs queued, maxCtl %d", ctl, m.cfg.maxCtl)
	}
	if conns > m.cfg.maxConns {
		t.Fatalf("%d connections, maxConns %d", conns, m.cfg.maxConns)
	}
	if rxq > m.cfg.maxConns {
		t.Fatalf("%d connections in the rx queue, maxConns %d", rxq, m.cfg.maxConns)
	}
	for _, c := range live {
		if n := c.buffered(); n > int(m.cfg.conn.bufAlloc) {
			t.Fatalf("connection %s buffers %d guest bytes, buf_alloc %d", c.key, n, m.cfg.conn.bufAlloc)
		}
	}
}

// fuzzSeeds are step sequences that reach each part of the muxer, so plain `go test` runs them.
func fuzzSeeds() [][]byte {
	pkt := func(op Op, src, dstIdx, flags, bufAlloc, fwd, n, odd byte) []byte {
		return []byte{stepPacket, byte(op), src, dstIdx, flags, bufAlloc, fwd, n, odd}
	}
	drain := func(k, size byte) []byte { return []byte{stepDrain, k, size, 0, 0, 0, 0, 0, 0} }
	host := func(what, arg byte) []byte { return []byte{stepHost, what, arg, 0, 0, 0, 0, 0, 0} }
	join := func(steps ...[]byte) []byte {
		var b []byte
		for _, s := range steps {
			b = append(b, s...)
		}
		return b
	}
	var flood, retired []byte
	for i := range 40 {
		// REQUESTs to a port nobody serves, never draining rx.
		flood = append(flood, pkt(OpRequest, byte(i), 1, 0, 255, 0, 0, 0)...)
		flood = append(flood, host(1, 1)...)
		// Connections that are made and reset again, never draining rx.
		retired = append(retired, pkt(OpRequest, byte(i), 2, 0, 255, 0, 0, 0)...)
		retired = append(retired, host(1, 2)...)
		retired = append(retired, pkt(OpRst, byte(i), 2, 0, 0, 0, 0, 0)...)
	}
	return [][]byte{
		// Connect to the stalled port and overrun its buffer.
		join(pkt(OpRequest, 0, 0, 0, 255, 0, 0, 0), host(1, 5), drain(2, 0),
			pkt(OpRW, 0, 0, 0, 255, 0, 255, 0), pkt(OpRW, 0, 0, 0, 255, 0, 255, 0), pkt(OpRW, 0, 0, 0, 255, 0, 255, 0),
			drain(4, 0)),
		// Connect to the answering port, send, shut down, read the answer.
		join(pkt(OpRequest, 1, 2, 0, 255, 0, 0, 0), host(1, 5), drain(2, 64),
			pkt(OpRW, 1, 2, 0, 255, 0, 10, 0), pkt(OpShutdown, 1, 2, byte(ShutdownSend), 255, 0, 0, 0), host(1, 7),
			drain(7, 64), pkt(OpCreditUpdate, 1, 2, 0, 255, 255, 0, 0), drain(7, 64)),
		// A host client dials; the fuzzer answers on the port it learns from the drained REQUEST.
		join(host(0, 0), host(1, 7), drain(1, 0), pkt(OpResponse, 0, 4, 0, 255, 0, 0, 0),
			pkt(OpCreditRequest, 0, 4, 0, 255, 0, 0, 0), drain(3, 0), pkt(OpShutdown, 0, 4, 3, 0, 0, 0, 0), drain(3, 0)),
		// Malformed packets: seqpacket, another CID, a length past the buffers, unknown ops.
		join(pkt(OpRequest, 2, 1, 0, 0, 0, 0, 1), pkt(OpRW, 2, 1, 0, 0, 0, 3, 2), pkt(OpRW, 2, 0, 0, 0, 0, 3, 4),
			pkt(8, 2, 0, 0, 0, 0, 0, 0), pkt(0, 2, 0, 0, 0, 0, 0, 0), drain(7, 0)),
		flood,
		retired,
	}
}

// fuzzHostPorts listens on m's host ports that the fuzz targets address: fuzzPortStalled, whose handler never
// reads, and fuzzPortAnswer, which echoes for a second.
func fuzzHostPorts(t *testing.T, m *muxer) {
	stalled := make(chan struct{})
	hostListen(t, m, fuzzPortStalled, func(net.Conn) { <-stalled })
	t.Cleanup(func() { close(stalled) }) // runs before hostListen's cleanup waits for the handlers
	hostListen(t, m, fuzzPortAnswer, func(c net.Conn) {
		c.SetDeadline(time.Now().Add(time.Second))
		b := make([]byte, 512)
		for {
			n, err := c.Read(b)
			if n > 0 {
				c.Write(b[:n])
			}
			if err != nil {
				return
			}
		}
	})
}
