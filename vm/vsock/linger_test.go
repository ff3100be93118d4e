package vsock

import (
	"io"
	"net"
	"testing"
	"time"
)

// TestHostClosedConnectionIsResetWhenGuestStaysSilent pins finding 10 of issue 11: once the host side of a
// connection is closed and the guest was told (SHUTDOWN), a guest that never answers with its own SHUTDOWN or
// RST loses the connection after the kill timeout: the device resets it and forgets it. A guest that still
// sends is slow, not silent, and keeps it until it stops. A host that only half-closed (stdin's EOF) still
// reads, so that connection lives on however long the guest is silent.
func TestHostClosedConnectionIsResetWhenGuestStaysSilent(t *testing.T) {
	const kill = 200 * time.Millisecond
	tests := []struct {
		name       string
		hostDials  bool // host-initiated (CONNECT) rather than guest-initiated
		halfClose  bool // the host shuts its write side only
		talking    bool // the guest keeps sending credit updates for a while before it falls silent
		wantKilled bool
	}{
		{"host-initiated, host closes", true, false, false, true},
		{"guest-initiated, host closes", false, false, false, true},
		{"host closes, guest talks a while then falls silent", false, false, true, true},
		{"host-initiated, host half-closes", true, true, false, false},
		{"guest-initiated, host half-closes", false, true, false, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := testMuxerConfig(t)
			cfg.conn.killTimeout = kill
			m := newTestMuxer(t, cfg)
			g := newFakeGuest(t, m)
			var host *net.UnixConn
			var gs *guestSock
			if tt.hostDials {
				accepted := g.listen(1024)
				c, err := Dial(dialCtx(t), m.cfg.udsPath, 1024)
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { c.Close() })
				host, gs = c.(*net.UnixConn), accept(t, accepted)
			} else {
				conns := make(chan *net.UnixConn, 1)
				done := make(chan struct{})
				hostListen(t, m, 1234, func(c net.Conn) {
					conns <- c.(*net.UnixConn)
					<-done
				})
				t.Cleanup(func() { close(done) }) // before hostListen's cleanup waits for the handler
				s, err := g.connect(1234)
				if err != nil {
					t.Fatal(err)
				}
				gs, host = s, <-conns
			}

			if tt.halfClose {
				host.CloseWrite()
			} else {
				host.Close()
			}
			// The guest sees the host's EOF, then stays silent.
			if n, err := gs.Read(make([]byte, 1)); n != 0 || err != io.EOF {
				t.Fatalf("guest read after host close: %d, %v; want EOF", n, err)
			}
			if tt.talking {
				// A guest that still talks is slow, not silent: the connection stays.
				for range 10 {
					g.send(gs, Header{Op: OpCreditUpdate}, nil)
					time.Sleep(kill / 2)
				}
				gs.mu.Lock()
				reset := gs.reset
				gs.mu.Unlock()
				if reset {
					t.Fatal("connection reset while the guest was still sending")
				}
			}
			if !tt.wantKilled {
				time.Sleep(5 * kill)
				gs.mu.Lock()
				reset := gs.reset
				gs.mu.Unlock()
				if reset || m.numConns() != 1 {
					t.Fatalf("half-closed connection ended (guest reset %v, %d connections)", reset, m.numConns())
				}
				// Still usable towards the host.
				if _, err := gs.Write([]byte("late")); err != nil {
					t.Fatal(err)
				}
				b := make([]byte, 4)
				host.SetReadDeadline(time.Now().Add(10 * time.Second))
				if _, err := io.ReadFull(host, b); err != nil || string(b) != "late" {
					t.Fatalf("host read %q, %v after the guest wrote on a half-closed connection", b, err)
				}
				return
			}
			gs.mu.Lock()
			reset := gs.waitLocked(func() bool { return gs.reset })
			gs.mu.Unlock()
			if !reset {
				t.Fatal("a silent guest kept a host-closed connection: no RST")
			}
			waitFor(t, "connection to be forgotten", func() bool { return m.numConns() == 0 })
			if n := m.stats.snapshot().ConnsKilled; n != 1 {
				t.Fatalf("ConnsKilled = %d, want 1", n)
			}
		})
	}
}
