package vsock

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/kiln-runtime/kiln/vm/vhostuser"
	"github.com/kiln-runtime/kiln/vm/virtqueue"
)

var _ vhostuser.Device = (*Device)(nil)

// fakeQueue is a virtqueue reduced to what the device sees: chains to pop and used elements pushed.
type fakeQueue struct {
	mu       sync.Mutex
	avail    []*virtqueue.Chain // a chain with Head but no buffers stands for a malformed one (see addBad)
	bad      map[*virtqueue.Chain]bool
	used     map[uint16]uint32
	notifies int
	kicks    chan struct{}
	size     uint16 // when set, Push refuses a head at or past it, as a real queue does
	flood    bool   // Pop returns malformed chains without end, as a guest that keeps posting them
	floods   int    // how many of those it returned
}

func newFakeQueue() *fakeQueue {
	return &fakeQueue{used: map[uint16]uint32{}, bad: map[*virtqueue.Chain]bool{}, kicks: make(chan struct{}, 1)}
}

func (q *fakeQueue) Pop() (*virtqueue.Chain, error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.flood {
		q.floods++
		return nil, &virtqueue.ChainError{Head: uint16(q.floods), Err: errors.New("flooded by the test")}
	}
	if len(q.avail) == 0 {
		return nil, nil
	}
	c := q.avail[0]
	q.avail = q.avail[1:]
	if q.bad[c] {
		delete(q.bad, c)
		return nil, &virtqueue.ChainError{Head: c.Head, Err: errors.New("made malformed by the test")}
	}
	return c, nil
}

// addBad makes a malformed chain available: Pop consumes it and reports a ChainError.
func (q *fakeQueue) addBad(head uint16) {
	c := &virtqueue.Chain{Head: head}
	q.mu.Lock()
	q.bad[c] = true
	q.mu.Unlock()
	q.add(c)
}

func (q *fakeQueue) usedCount() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.used)
}

func (q *fakeQueue) Push(head uint16, written uint32) error {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.size > 0 && head >= q.size {
		return fmt.Errorf("head %d out of range (queue size %d)", head, q.size)
	}
	q.used[head] = written
	return nil
}

func (q *fakeQueue) Notify() error {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.notifies++
	return nil
}

func (q *fakeQueue) Kicks() <-chan struct{} { return q.kicks }

func (q *fakeQueue) notified() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.notifies
}

// addMany makes chains available and kicks once.
func (q *fakeQueue) addMany(cs []*virtqueue.Chain) {
	q.mu.Lock()
	q.avail = append(q.avail, cs...)
	q.mu.Unlock()
	select {
	case q.kicks <- struct{}{}:
	default:
	}
}

// add makes a chain available and kicks.
func (q *fakeQueue) add(c *virtqueue.Chain) {
	q.mu.Lock()
	q.avail = append(q.avail, c)
	q.mu.Unlock()
	select {
	case q.kicks <- struct{}{}:
	default:
	}
}

func (q *fakeQueue) usedLen(head uint16) (uint32, bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	n, ok := q.used[head]
	return n, ok
}

func guestPacket(h Header, payload []byte) [][]byte {
	h.SrcCID, h.DstCID, h.Type, h.Len = testCID, HostCID, TypeStream, uint32(len(payload))
	b := make([]byte, HeaderSize)
	h.Encode(b)
	return [][]byte{b, payload}
}

func TestDeviceIdentity(t *testing.T) {
	d, err := newDevice(testMuxerConfig(t), testLog())
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if d.NumQueues() != 2 || d.Features() != 0 {
		t.Fatalf("NumQueues %d Features %#x", d.NumQueues(), d.Features())
	}
	if cfg := d.Config(); len(cfg) != 8 || binary.LittleEndian.Uint64(cfg) != testCID {
		t.Fatalf("Config = %x", cfg)
	}
	if err := d.Start(nil); err == nil {
		t.Fatal("Start without queues succeeded")
	}
}

func TestNewRejectsReservedCID(t *testing.T) {
	for _, cid := range []uint64{0, 1, 2, 1 << 32} {
		if d, err := New(Config{GuestCID: cid, UDSPath: t.TempDir() + "/v"}, testLog()); err == nil {
			d.Close()
			t.Errorf("New accepted CID %d", cid)
		}
	}
}

// TestDeviceQueuesAcrossStopStart drives the device through fake queues: a guest connection made before Stop
// keeps working after Start, and Stop returns with both goroutines gone.
func TestDeviceQueuesAcrossStopStart(t *testing.T) {
	d, err := newDevice(testMuxerConfig(t), testLog())
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	got := make(chan []byte, 1)
	hostListen(t, d.mux, 1234, func(c net.Conn) {
		b, _ := io.ReadAll(c)
		got <- b
	})
	rx, tx := newFakeQueue(), newFakeQueue()
	if err := d.start(rx, tx); err != nil {
		t.Fatal(err)
	}
	rxBuf := make([]byte, HeaderSize+4096)
	rx.add(&virtqueue.Chain{Head: 7, Writable: [][]byte{rxBuf}})
	tx.add(&virtqueue.Chain{Head: 3, Readable: guestPacket(Header{Op: OpRequest, SrcPort: 5000, DstPort: 1234, BufAlloc: 1 << 16}, nil)})

	waitFor(t, "RESPONSE in the rx queue", func() bool { _, ok := rx.usedLen(7); return ok })
	if n, _ := tx.usedLen(3); n != 0 {
		t.Fatalf("tx chain used with %d bytes written", n)
	}
	h, _ := DecodeHeader(rxBuf)
	if h.Op != OpResponse || h.DstPort != 5000 || h.SrcPort != 1234 {
		t.Fatalf("rx packet %+v, want RESPONSE", h)
	}

	d.Stop()
	d.Stop() // idempotent
	// Stopped: a kick is not served.
	tx.add(&virtqueue.Chain{Head: 4, Readable: guestPacket(Header{Op: OpRW, SrcPort: 5000, DstPort: 1234}, []byte("hello "))})
	time.Sleep(50 * time.Millisecond)
	if _, ok := tx.usedLen(4); ok {
		t.Fatal("stopped device consumed a tx chain")
	}

	if err := d.start(rx, tx); err != nil {
		t.Fatal(err)
	}
	tx.add(&virtqueue.Chain{Head: 5, Readable: guestPacket(Header{Op: OpRW, SrcPort: 5000, DstPort: 1234}, []byte("world"))})
	tx.add(&virtqueue.Chain{Head: 6, Readable: guestPacket(Header{Op: OpShutdown, Flags: shutdownBoth, SrcPort: 5000, DstPort: 1234}, nil)})
	select {
	case b := <-got:
		if !bytes.Equal(b, []byte("hello world")) {
			t.Fatalf("host got %q", b)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("host got nothing")
	}
	// The full shutdown is answered with a RST once the data is delivered.
	rx.add(&virtqueue.Chain{Head: 8, Writable: [][]byte{rxBuf[:HeaderSize], rxBuf[HeaderSize:]}})
	waitFor(t, "RST in the rx queue", func() bool { _, ok := rx.usedLen(8); return ok })
	if h, _ := DecodeHeader(rxBuf); h.Op != OpRst {
		t.Fatalf("rx packet %v, want RST", h.Op)
	}
	d.Stop()
	// The REQUEST, the two RWs and the SHUTDOWN came from the guest (the RW of a stopped device was served after
	// its restart); the RESPONSE and the RST went to it.
	if got, want := d.Traffic(), (Traffic{FromGuest: 4, ToGuest: 2}); got != want {
		t.Fatalf("traffic %+v, want %+v", got, want)
	}
}

// TestTxCompletionsAreNotifiedInBatches pins that used tx chains are told to the driver once per txNotifyBatch,
// and that a remainder is still told within txNotifyDelay rather than waiting for more packets.
func TestTxCompletionsAreNotifiedInBatches(t *testing.T) {
	d, err := newDevice(testMuxerConfig(t), testLog())
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	rx, tx := newFakeQueue(), newFakeQueue()
	// A RST for no connection is dropped without an answer, so the rx queue stays out of it.
	chains := func(first, n int) []*virtqueue.Chain {
		var cs []*virtqueue.Chain
		for i := range n {
			cs = append(cs, &virtqueue.Chain{Head: uint16(first + i),
				Readable: guestPacket(Header{Op: OpRst, SrcPort: 5000, DstPort: 1234}, nil)})
		}
		return cs
	}
	tx.addMany(chains(0, 2*txNotifyBatch+1))
	if err := d.start(rx, tx); err != nil {
		t.Fatal(err)
	}
	defer d.Stop()
	waitFor(t, "every tx chain used", func() bool { return tx.usedCount() == 2*txNotifyBatch+1 })
	waitFor(t, "the remainder notified", func() bool { return tx.notified() >= 3 })
	time.Sleep(10 * txNotifyDelay)
	if n := tx.notified(); n != 3 {
		t.Fatalf("%d tx chains notified %d times, want 3: two batches and the remainder", 2*txNotifyBatch+1, n)
	}
	// A lone packet is told too, on its own.
	tx.addMany(chains(100, 1))
	waitFor(t, "a lone chain notified", func() bool { return tx.notified() == 4 })
}
