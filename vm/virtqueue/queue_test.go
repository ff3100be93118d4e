package virtqueue

import (
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestPopSimpleChainedAndIndirect(t *testing.T) {
	r := newTestRing(t)
	q := r.queue(false, -1, -1)

	// Head 0: one readable buffer.
	r.fill(dataBase, "hello")
	r.setDesc(descAddr, 0, dataBase, 5, 0, 0)
	// Head 3: readable -> writable -> writable, in a non-contiguous order.
	r.fill(dataBase+0x100, "hdr")
	r.setDesc(descAddr, 3, dataBase+0x100, 3, descFNext, 5)
	r.setDesc(descAddr, 5, dataBase+0x200, 16, descFNext|descFWrite, 1)
	r.setDesc(descAddr, 1, dataBase+0x300, 32, descFWrite, 0)
	// Head 6: an indirect table of two readable and one writable descriptors.
	table := uint64(dataBase + 0x1000)
	r.fill(dataBase+0x400, "ab")
	r.fill(dataBase+0x500, "cde")
	r.setDesc(table, 0, dataBase+0x400, 2, descFNext, 2)
	r.setDesc(table, 2, dataBase+0x500, 3, descFNext, 1)
	r.setDesc(table, 1, dataBase+0x600, 8, descFWrite, 0)
	r.setDesc(descAddr, 6, table, 3*16, descFIndirect, 0)
	r.offer(0)
	r.offer(3)
	r.offer(6)

	tests := []struct {
		head     uint16
		readable []string
		writable []int
	}{
		{0, []string{"hello"}, nil},
		{3, []string{"hdr"}, []int{16, 32}},
		{6, []string{"ab", "cde"}, []int{8}},
	}
	for _, tt := range tests {
		c, err := q.Pop()
		if err != nil || c == nil {
			t.Fatalf("Pop for head %d: %v, %v", tt.head, c, err)
		}
		if c.Head != tt.head {
			t.Fatalf("head %d, want %d", c.Head, tt.head)
		}
		var got []string
		for _, b := range c.Readable {
			got = append(got, string(b))
		}
		if strings.Join(got, ",") != strings.Join(tt.readable, ",") {
			t.Errorf("head %d readable %q, want %q", tt.head, got, tt.readable)
		}
		if len(c.Writable) != len(tt.writable) {
			t.Fatalf("head %d has %d writable buffers, want %d", tt.head, len(c.Writable), len(tt.writable))
		}
		for i, n := range tt.writable {
			if len(c.Writable[i]) != n {
				t.Errorf("head %d writable %d has %d bytes, want %d", tt.head, i, len(c.Writable[i]), n)
			}
		}
	}
	if c, err := q.Pop(); c != nil || err != nil {
		t.Fatalf("Pop on an empty ring = %v, %v", c, err)
	}
	if q.LastAvail() != 3 {
		t.Fatalf("LastAvail %d, want 3", q.LastAvail())
	}
}

func TestWritableBufferAliasesGuestMemory(t *testing.T) {
	r := newTestRing(t)
	q := r.queue(false, -1, -1)
	r.setDesc(descAddr, 2, dataBase, 8, descFWrite, 0)
	r.offer(2)
	c, err := q.Pop()
	if err != nil {
		t.Fatal(err)
	}
	copy(c.Writable[0], "written!")
	if got := string(r.bytes(dataBase, 8)); got != "written!" {
		t.Fatalf("guest memory holds %q", got)
	}
}

func TestPopRejectsMalformedChains(t *testing.T) {
	outside := uint64(memBase + memSize)
	table := uint64(dataBase + 0x1000)
	tests := []struct {
		name  string
		build func(r *testRing) uint16 // returns the head to offer
		want  string
	}{
		{"loop", func(r *testRing) uint16 {
			r.setDesc(descAddr, 0, dataBase, 1, descFNext, 1)
			r.setDesc(descAddr, 1, dataBase, 1, descFNext, 0)
			return 0
		}, "loop"},
		{"self loop", func(r *testRing) uint16 {
			r.setDesc(descAddr, 4, dataBase, 1, descFNext, 4)
			return 4
		}, "loop"},
		{"head out of range", func(r *testRing) uint16 { return testSize }, "head index out of range"},
		{"next out of range", func(r *testRing) uint16 {
			r.setDesc(descAddr, 0, dataBase, 1, descFNext, testSize+3)
			return 0
		}, "next index"},
		{"buffer outside guest memory", func(r *testRing) uint16 {
			r.setDesc(descAddr, 0, outside, 16, 0, 0)
			return 0
		}, "outside guest memory"},
		{"buffer crossing the end of guest memory", func(r *testRing) uint16 {
			r.setDesc(descAddr, 0, outside-8, 16, 0, 0)
			return 0
		}, "outside guest memory"},
		{"readable after writable", func(r *testRing) uint16 {
			r.setDesc(descAddr, 0, dataBase, 4, descFWrite|descFNext, 1)
			r.setDesc(descAddr, 1, dataBase, 4, 0, 0)
			return 0
		}, "readable after"},
		{"indirect with next", func(r *testRing) uint16 {
			r.setDesc(table, 0, dataBase, 4, 0, 0)
			r.setDesc(descAddr, 0, table, 16, descFIndirect|descFNext, 1)
			return 0
		}, "both INDIRECT and NEXT"},
		{"indirect table of odd length", func(r *testRing) uint16 {
			r.setDesc(descAddr, 0, table, 20, descFIndirect, 0)
			return 0
		}, "multiple of 16"},
		{"empty indirect table", func(r *testRing) uint16 {
			r.setDesc(descAddr, 0, table, 0, descFIndirect, 0)
			return 0
		}, "multiple of 16"},
		{"indirect table outside guest memory", func(r *testRing) uint16 {
			r.setDesc(descAddr, 0, outside-16, 32, descFIndirect, 0)
			return 0
		}, "indirect table"},
		{"nested indirect", func(r *testRing) uint16 {
			r.setDesc(table, 0, table, 16, descFIndirect, 0)
			r.setDesc(descAddr, 0, table, 16, descFIndirect, 0)
			return 0
		}, "inside an indirect table"},
		{"loop inside indirect table", func(r *testRing) uint16 {
			r.setDesc(table, 0, dataBase, 1, descFNext, 1)
			r.setDesc(table, 1, dataBase, 1, descFNext, 0)
			r.setDesc(descAddr, 0, table, 32, descFIndirect, 0)
			return 0
		}, "loop"},
		{"next out of indirect table", func(r *testRing) uint16 {
			r.setDesc(table, 0, dataBase, 1, descFNext, 2)
			r.setDesc(descAddr, 0, table, 32, descFIndirect, 0)
			return 0
		}, "next index 2 out of range"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := newTestRing(t)
			q := r.queue(false, -1, -1)
			head := tt.build(r)
			r.offer(head)
			c, err := q.Pop()
			if err == nil {
				t.Fatalf("Pop accepted the chain: %+v", c)
			}
			var ce *ChainError
			if !errors.As(err, &ce) || ce.Head != head || !errors.Is(err, ErrMalformedChain) {
				t.Fatalf("error %v is not a ChainError for head %d", err, head)
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("error %q does not mention %q", err, tt.want)
			}
			// The bad chain is consumed; the ring moves on.
			if c, err := q.Pop(); c != nil || err != nil {
				t.Fatalf("second Pop = %v, %v; want empty", c, err)
			}
		})
	}
}

func TestPopRejectsRunawayAvailIndex(t *testing.T) {
	r := newTestRing(t)
	q := r.queue(false, -1, -1)
	r.availIdx = testSize + 1
	r.offer(0)
	if _, err := q.Pop(); err == nil || !strings.Contains(err.Error(), "ahead") {
		t.Fatalf("Pop = %v, want an index error", err)
	}
}

func TestPushWritesUsedRing(t *testing.T) {
	r := newTestRing(t)
	q := r.queue(false, -1, -1)
	for i := range uint16(testSize + 2) { // wraps around the used ring
		if err := q.Push(i%testSize, uint32(100+i)); err != nil {
			t.Fatal(err)
		}
		if got := r.usedIdx(); got != i+1 {
			t.Fatalf("used idx %d, want %d", got, i+1)
		}
		if id, n := r.usedElem(i); id != uint32(i%testSize) || n != uint32(100+i) {
			t.Fatalf("used elem %d = (%d, %d)", i, id, n)
		}
	}
	if err := q.Push(testSize, 0); err == nil {
		t.Fatal("Push accepted an out-of-range head")
	}
}

func TestNotifyWithoutEventIdx(t *testing.T) {
	r := newTestRing(t)
	call := eventfd(t)
	q := r.queue(false, -1, call)

	if err := q.Notify(); err != nil || signalled(t, call) {
		t.Fatalf("Notify with nothing used signalled (err %v)", err)
	}
	q.Push(0, 1)
	if err := q.Notify(); err != nil || !signalled(t, call) {
		t.Fatalf("Notify after Push did not signal (err %v)", err)
	}
	r.setAvailFlags(availFNoInterrupt)
	q.Push(1, 1)
	if err := q.Notify(); err != nil || signalled(t, call) {
		t.Fatalf("Notify signalled despite VIRTQ_AVAIL_F_NO_INTERRUPT (err %v)", err)
	}
	r.setAvailFlags(0)
	q.Push(2, 1)
	if err := q.Notify(); err != nil || !signalled(t, call) {
		t.Fatalf("Notify after clearing NO_INTERRUPT did not signal (err %v)", err)
	}
}

func TestNotifyWithEventIdx(t *testing.T) {
	tests := []struct {
		name      string
		usedEvent uint16
		pushes    int // used entries published before Notify, starting from used index 0
		want      bool
	}{
		{"driver wants the first entry", 0, 1, true},
		{"driver waits for entry 3, one pushed", 2, 1, false},
		{"driver waits for entry 3, three pushed", 2, 3, true},
		{"driver waits for entry 3, five pushed", 2, 5, true},
		{"event already passed before these entries", 0xfff0, 2, false},
		{"NO_INTERRUPT flag is ignored with EVENT_IDX", 0, 1, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := newTestRing(t)
			call := eventfd(t)
			q := r.queue(true, -1, call)
			r.setAvailFlags(availFNoInterrupt)
			r.setUsedEvent(tt.usedEvent)
			for i := range tt.pushes {
				q.Push(uint16(i%testSize), 0)
			}
			if err := q.Notify(); err != nil {
				t.Fatal(err)
			}
			if got := signalled(t, call); got != tt.want {
				t.Fatalf("signalled %v, want %v", got, tt.want)
			}
		})
	}
}

func TestEventIdxNotifyCountsFromLastNotify(t *testing.T) {
	r := newTestRing(t)
	call := eventfd(t)
	q := r.queue(true, -1, call)
	r.setUsedEvent(0)
	q.Push(0, 0)
	q.Notify()
	if !signalled(t, call) {
		t.Fatal("first notify missing")
	}
	// The driver has not moved used_event: entry 0 was already signalled, so entry 1 must not be.
	q.Push(1, 0)
	q.Notify()
	if signalled(t, call) {
		t.Fatal("signalled again for an event the driver already got")
	}
	// The driver asks for the entry at used index 2.
	r.setUsedEvent(2)
	q.Push(2, 0)
	q.Notify()
	if !signalled(t, call) {
		t.Fatal("used_event 2 crossed without a signal")
	}
}

func TestPopPublishesAvailEventWhenEmpty(t *testing.T) {
	r := newTestRing(t)
	q := r.queue(true, -1, -1)
	r.setDesc(descAddr, 0, dataBase, 1, 0, 0)
	r.offer(0)
	r.offer(0)
	for range 2 {
		if c, err := q.Pop(); c == nil || err != nil {
			t.Fatalf("Pop = %v, %v", c, err)
		}
	}
	if c, err := q.Pop(); c != nil || err != nil {
		t.Fatalf("Pop on empty ring = %v, %v", c, err)
	}
	if got := r.availEvent(); got != 2 {
		t.Fatalf("avail_event %d, want 2 (kick me on the next buffer)", got)
	}
}

func TestNewRejectsBadLayouts(t *testing.T) {
	mem := newTestMemory(t)
	ok := Config{Size: testSize, DescAddr: descAddr, AvailAddr: availAddr, UsedAddr: usedAddr, KickFD: -1, CallFD: -1}
	tests := []struct {
		name string
		edit func(c *Config)
	}{
		{"zero size", func(c *Config) { c.Size = 0 }},
		{"size not a power of two", func(c *Config) { c.Size = 6 }},
		{"misaligned descriptor table", func(c *Config) { c.DescAddr += 8 }},
		{"misaligned used ring", func(c *Config) { c.UsedAddr += 2 }},
		{"descriptor table outside memory", func(c *Config) { c.DescAddr = memBase + memSize - 16 }},
		{"used ring outside memory", func(c *Config) { c.UsedAddr = 0x100 }},
		{"bad kick fd", func(c *Config) { c.KickFD = 1 << 20 }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := ok
			tt.edit(&c)
			if q, err := New(mem, c); err == nil {
				q.Close()
				t.Fatal("New accepted the layout")
			}
		})
	}
	q, err := New(mem, ok)
	if err != nil {
		t.Fatalf("New with a good layout: %v", err)
	}
	q.Close()
}

func TestKicksAndStop(t *testing.T) {
	r := newTestRing(t)
	kick := eventfd(t)
	// The eventfd comes blocking from the frontend; the queue must still be able to stop its reader.
	if err := unix.SetNonblock(kick, false); err != nil {
		t.Fatal(err)
	}
	q := r.queue(false, kick, -1)
	recv := func(what string) {
		t.Helper()
		select {
		case _, ok := <-q.Kicks():
			if !ok {
				t.Fatalf("%s: Kicks closed", what)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("%s: no kick", what)
		}
	}
	recv("initial kick")
	for i := range 3 {
		unix.Write(kick, []byte{1, 0, 0, 0, 0, 0, 0, 0})
		recv("kick " + string(rune('0'+i)))
	}
	done := make(chan struct{})
	go func() { q.Stop(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Stop blocked on the kick reader")
	}
	if _, ok := <-q.Kicks(); ok {
		t.Fatal("Kicks still open after Stop")
	}
	q.Stop() // idempotent
}

// The front end shares the kick eventfd's file description: made blocking again after the queue started, it still
// delivers kicks, and Stop still ends the reader (a read(2) waiting on it would have held Stop for good).
func TestStopAfterTheKickFDTurnsBlocking(t *testing.T) {
	r := newTestRing(t)
	kick := eventfd(t)
	q := r.queue(false, kick, -1)
	<-q.Kicks()
	if err := unix.SetNonblock(kick, false); err != nil {
		t.Fatal(err)
	}
	for range 3 {
		if _, err := unix.Write(kick, []byte{1, 0, 0, 0, 0, 0, 0, 0}); err != nil {
			t.Fatal(err)
		}
		select {
		case <-q.Kicks():
		case <-time.After(5 * time.Second):
			t.Fatal("no kick through a blocking eventfd")
		}
	}
	// Time for the reader to wait for the next kick.
	time.Sleep(50 * time.Millisecond)
	done := make(chan struct{})
	go func() { q.Stop(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Stop blocked on a reader of the blocking kick eventfd")
	}
}

func TestSetCallFDAndClose(t *testing.T) {
	r := newTestRing(t)
	first, second := eventfd(t), eventfd(t)
	q := r.queue(false, -1, first)
	if err := q.SetCallFD(second); err != nil {
		t.Fatal(err)
	}
	q.Push(0, 0)
	q.Notify()
	if signalled(t, first) || !signalled(t, second) {
		t.Fatal("Notify did not use the replaced call fd")
	}
	q.Close()
	q.Push(1, 0)
	if err := q.Notify(); err != nil || signalled(t, second) {
		t.Fatalf("Notify after Close signalled (err %v)", err)
	}
}

// A signal is written when Notify returns: a call fd replaced or closed right after it (QEMU checks the one it
// replaces for a pending signal) has it, and the new one does not.
func TestNotifyIsWrittenWhenItReturns(t *testing.T) {
	r := newTestRing(t)
	first := eventfd(t)
	q := r.queue(false, -1, first)
	for i := range 50 {
		second := eventfd(t)
		q.Push(uint16(i%testSize), 0)
		if err := q.Notify(); err != nil {
			t.Fatal(err)
		}
		if err := q.SetCallFD(second); err != nil {
			t.Fatal(err)
		}
		if !signalled(t, first) || signalled(t, second) {
			t.Fatalf("round %d: the signal did not reach the call fd replaced after Notify", i)
		}
		first = second
	}
	q.Push(0, 0)
	q.Notify()
	q.Close()
	if !signalled(t, first) {
		t.Fatal("the signal of a Notify just before Close was lost")
	}
}

// A front end can make the call eventfd blocking and fill its counter (its file description is shared): Notify
// waits for the write a moment, then leaves it held and returns; nothing more is written while it is held, and
// Close returns. The held write goes through once the counter is read.
func TestNotifyDoesNotWaitForAFullCounter(t *testing.T) {
	r := newTestRing(t)
	call, err := unix.Eventfd(0, unix.EFD_CLOEXEC) // blocking, as a front end can make it
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(call) })
	full := make([]byte, 8)
	binary.LittleEndian.PutUint64(full, 0xfffffffffffffffe)
	if _, err := unix.Write(call, full); err != nil {
		t.Fatal(err)
	}
	q := r.queue(false, -1, call)
	returns := func(what string, f func()) {
		t.Helper()
		done := make(chan struct{})
		go func() { f(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatalf("%s waits for the driver to read a full call eventfd", what)
		}
	}
	for i := range 3 {
		returns(fmt.Sprintf("Notify %d", i), func() {
			q.Push(uint16(i), 0)
			if err := q.Notify(); err != nil {
				t.Error(err)
			}
		})
		if !q.Held() {
			t.Fatalf("after Notify %d: no write held", i)
		}
	}
	returns("Close", q.Close)
	got := make([]byte, 8)
	if _, err := unix.Read(call, got); err != nil || binary.LittleEndian.Uint64(got) != 0xfffffffffffffffe {
		t.Fatalf("read the full counter: %v, %#x", err, got)
	}
	// The one held write goes through now, and no other was made.
	for deadline := time.Now().Add(10 * time.Second); q.Held(); time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the write is still held 10 s after the counter was read")
		}
	}
	if _, err := unix.Read(call, got); err != nil || binary.LittleEndian.Uint64(got) != 1 {
		t.Fatalf("the held signal: %v, %#x, want 1", err, got)
	}
}

// A write not done within the wait is held, but it need not be blocked: on a loaded host its goroutine can wait
// that long for a CPU after its write went through, and the driver takes that signal and asks for the next one.
// A signal asked for while the write is held is written once it ends: dropped, it was lost for good with event
// indexes (the guest saw nothing more of the queue).
func TestSignalAskedForWhileAWriteIsHeldIsWritten(t *testing.T) {
	call := eventfd(t)
	dup, err := dupCloexec(call)
	if err != nil {
		t.Fatal(err)
	}
	slow := make(chan struct{})
	c := &caller{fd: dup, afterWrite: func() { <-slow }}
	t.Cleanup(func() { c.close() })
	if err := c.signal(); err != nil {
		t.Fatal(err)
	}
	if !c.isHeld() {
		t.Fatal("a write whose goroutine did not end within the wait is not held")
	}
	if !signalled(t, call) {
		t.Fatal("the held write did not go through")
	}
	c.mu.Lock()
	c.afterWrite = nil
	c.mu.Unlock()
	// The driver took the first signal and asks for the next.
	if err := c.signal(); err != nil {
		t.Fatal(err)
	}
	close(slow)
	for deadline := time.Now().Add(10 * time.Second); !signalled(t, call); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the signal asked for while a write was held was never written")
		}
	}
}
