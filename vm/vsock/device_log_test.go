package vsock

import (
	"io"
	"strings"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	logtest "github.com/sirupsen/logrus/hooks/test"

	"github.com/kiln-runtime/kiln/vm/virtqueue"
)

// quietDevice is a device whose log goes to the hook it returns only; it is closed when the test ends.
func quietDevice(t *testing.T) (*Device, *logtest.Hook) {
	t.Helper()
	l, hook := logtest.NewNullLogger()
	l.SetOutput(io.Discard)
	d, err := newDevice(testMuxerConfig(t), logrus.NewEntry(l))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = d.Close() })
	return d, hook
}

// warnings counts the entries at warning level or above whose message contains s.
func warnings(h *logtest.Hook, s string) int {
	n := 0
	for _, e := range h.AllEntries() {
		if e.Level <= logrus.WarnLevel && strings.Contains(e.Message, s) {
			n++
		}
	}
	return n
}

// TestMalformedChainWarningsAreThrottled pins finding 7 of issue 11: a guest that fills its rings with malformed
// descriptor chains gets every chain back but costs a bounded number of log lines, not one per chain.
func TestMalformedChainWarningsAreThrottled(t *testing.T) {
	const bad = 1000
	tests := []struct {
		name       string
		rx         bool // the chains go to the rx queue
		add        func(q *fakeQueue, head uint16)
		outOfRange bool // the heads lie past the ring, so none can be given back
	}{
		{"malformed tx chains", false, (*fakeQueue).addBad, false},
		{"malformed rx chains", true, (*fakeQueue).addBad, false},
		{"rx chains too small for a packet header", true, func(q *fakeQueue, head uint16) {
			q.add(&virtqueue.Chain{Head: head, Writable: [][]byte{make([]byte, 10)}})
		}, false},
		{"tx heads out of the ring's range", false, (*fakeQueue).addBad, true},
		{"rx heads out of the ring's range", true, (*fakeQueue).addBad, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d, hook := quietDevice(t)
			rx, tx := newFakeQueue(), newFakeQueue()
			q := tx
			if tt.rx {
				q = rx
				// The rx loop pops only when a packet waits: an RW to an unknown port queues a RST.
				tx.add(&virtqueue.Chain{Head: 0, Readable: guestPacket(Header{Op: OpRW, SrcPort: 1, DstPort: 2}, []byte("x"))})
			}
			first, warned := uint16(0), bad
			if tt.outOfRange {
				// Each chain costs two refusals: the chain's and its return's.
				q.size, first, warned = 16, 16, 2*bad
			}
			for i := range bad {
				tt.add(q, first+uint16(i))
			}
			if err := d.start(rx, tx); err != nil {
				t.Fatal(err)
			}
			counted := func() uint64 {
				mt := d.Metrics()
				return mt.MalformedTxChains + mt.MalformedRxChains + mt.SmallRxChains
			}
			waitFor(t, "every malformed chain to be handled", func() bool { return counted() == bad })
			d.Stop()
			givenBack := bad
			if tt.outOfRange {
				givenBack = 0
			}
			if n := q.usedCount(); n != givenBack {
				t.Fatalf("%d malformed chains given back, want %d", n, givenBack)
			}
			if n := warnings(hook, ""); n > ringWarnBurst+1 {
				t.Fatalf("%d warnings for %d malformed chains, want at most %d and a summary", n, bad, ringWarnBurst)
			}
			mt := d.Metrics()
			if got := counted(); got != bad {
				t.Fatalf("metrics %+v count %d bad chains, want %d", mt, got, bad)
			}
			if mt.WarningsSuppressed != uint64(warned-ringWarnBurst) {
				t.Fatalf("WarningsSuppressed = %d, want %d", mt.WarningsSuppressed, warned-ringWarnBurst)
			}
			// Stopping sums up what was left out.
			if n := warnings(hook, "not logged"); n != 1 {
				t.Fatalf("%d summary lines after Stop, want 1", n)
			}
		})
	}
}

// TestStopWhileTheGuestFloodsRx: a guest that keeps posting malformed rx chains while a packet waits for it (they
// consume none) must not keep the device's Stop, and so QEMU's GET_VRING_BASE, waiting.
func TestStopWhileTheGuestFloodsRx(t *testing.T) {
	d, _ := quietDevice(t)
	rx, tx := newFakeQueue(), newFakeQueue()
	rx.flood = true
	// An RW to an unknown port queues a RST: from then on a packet waits for the guest.
	tx.add(&virtqueue.Chain{Head: 0, Readable: guestPacket(Header{Op: OpRW, SrcPort: 1, DstPort: 2}, []byte("x"))})
	if err := d.start(rx, tx); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the rx loop to meet the flood", func() bool { return d.Metrics().MalformedRxChains > 100 })
	stopped := make(chan struct{})
	go func() {
		d.Stop()
		close(stopped)
	}()
	select {
	case <-stopped:
	case <-time.After(10 * time.Second):
		rx.mu.Lock()
		rx.flood = false // so that the deferred Close can end
		rx.mu.Unlock()
		t.Fatal("Stop did not return within 10 s while the guest flooded its rx ring")
	}
}
