package vsock

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/kiln-runtime/kiln/vm/guestmem"
	"github.com/kiln-runtime/kiln/vm/virtqueue"
)

// Guest memory of the ring fuzzer: one sealed memfd region of ringMemSize bytes at ringMemBase. Each queue's
// three parts sit at the start; tx packets and rx buffers have slots of their own above. Descriptors the fuzzer
// writes by hand may point anywhere, inside guest memory or not.
const (
	ringMemBase = 0x100000
	ringMemSize = 0x10000
	ringSize    = 16
	ringSlots   = 8

	txDescOff   = 0x000
	txAvailOff  = 0x100
	txUsedOff   = 0x200
	rxDescOff   = 0x400
	rxAvailOff  = 0x500
	rxUsedOff   = 0x600
	usedRingLen = 4 + 8*ringSize + 2 // flags, idx, ring, avail_event

	txSlotOff   = 0x1000 // ringSlots slots of txSlotLen
	txSlotLen   = 0x1000
	rxSlotOff   = 0x9000 // ringSlots slots of rxSlotLen
	rxSlotLen   = 0xe00
	descNext    = 1
	descWrite   = 2
	descIndir   = 4
	ringStepLen = 12
	// ringMaxSteps bounds one input's run, so the fuzzer spends its time on new inputs.
	ringMaxSteps = 100
)

// Ring fuzzer steps; each takes ringStepLen bytes of the input (b0 the kind).
const (
	ringTxPacket = iota // b1-b8 a packet as fuzzPacket builds it, b9 slot, b10&1 header and payload in one buffer
	ringRxPost          // b1 slot, b2 payload buffer size / 16, b3&1 one buffer for header and payload
	ringRawDesc         // b1&1 queue (rx), b2 index, b3-4 address, b5 address kind, b6-7 length, b8 flags, b9 next, b10&1 offer it
	ringAvail           // b1&1 queue, b2 signed move of the available index, b3 available flags, b4-5 used_event
	ringRunTx           // the device drains the tx queue once, as after a kick
	ringRunRx           // the device fills rx buffers once, as after a kick
	ringHost            // as stepHost in FuzzMuxerTx
	ringPoke            // b1-2 offset in guest memory, b3-b11 bytes written there
	ringKinds
)

// FuzzDeviceRings drives the device through real split virtqueues in a memfd mapped by vm/guestmem, with
// descriptor tables and available rings written from fuzz input, and checks what the guest cannot be allowed to
// make the device do: read or write outside guest memory, write anything but rx buffers and used rings, loop
// without end, report more bytes than a buffer holds or send a malformed packet, keep a chain, count wrongly
// what it refused, or hold more than the muxer's bounds.
func FuzzDeviceRings(f *testing.F) {
	for _, seed := range ringSeeds() {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		mem, whole := fuzzGuestMemory(t)
		cfg := fuzzMuxerConfig(t)
		d, err := newDevice(cfg, testLog())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { d.Close() })
		fuzzHostPorts(t, d.mux)
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		eventIdx := len(data)%2 == 1
		tx := newCheckedQueue(t, mem, whole, "tx", txDescOff, txAvailOff, txUsedOff, eventIdx)
		rx := newCheckedQueue(t, mem, whole, "rx", rxDescOff, rxAvailOff, rxUsedOff, eventIdx)
		ports := []uint32{fuzzPortStalled, fuzzPortNobody, fuzzPortAnswer, 1024}
		for steps := 0; len(data) >= ringStepLen && steps < ringMaxSteps; data, steps = data[ringStepLen:], steps+1 {
			b := data[:ringStepLen]
			switch b[0] % ringKinds {
			case ringTxPacket:
				slot := uint64(b[9] % ringSlots)
				bufs := fuzzPacket(b[1:9], ports)
				at := txSlotOff + slot*txSlotLen
				copy(whole[at:], bufs[0])
				copy(whole[at+HeaderSize:], bufs[1])
				hdr := uint16(2 * slot)
				if b[10]&1 != 0 {
					tx.setDesc(hdr, ringMemBase+at, uint32(HeaderSize+len(bufs[1])), 0, 0)
				} else {
					tx.setDesc(hdr, ringMemBase+at, HeaderSize, descNext, hdr+1)
					tx.setDesc(hdr+1, ringMemBase+at+HeaderSize, uint32(len(bufs[1])), 0, 0)
				}
				tx.offer(hdr)
			case ringRxPost:
				slot := uint64(b[1] % ringSlots)
				at := rxSlotOff + slot*rxSlotLen
				n := min(uint32(b[2])*16, rxSlotLen-HeaderSize)
				hdr := uint16(2 * slot)
				if b[3]&1 != 0 {
					rx.setDesc(hdr, ringMemBase+at, HeaderSize+n, descWrite, 0)
				} else {
					rx.setDesc(hdr, ringMemBase+at, HeaderSize, descWrite|descNext, hdr+1)
					rx.setDesc(hdr+1, ringMemBase+at+HeaderSize, n, descWrite, 0)
				}
				rx.offer(hdr)
			case ringRawDesc:
				q := []*checkedQueue{tx, rx}[b[1]&1]
				off := uint64(binary.LittleEndian.Uint16(b[3:]))
				var addr uint64
				switch b[5] % 4 {
				case 0:
					addr = ringMemBase + off
				case 1:
					addr = ringMemBase + ringMemSize - off // at or past the end
				case 2:
					addr = ringMemBase - off // before the start
				case 3:
					addr = ^uint64(0) - off
				}
				n := uint32(binary.LittleEndian.Uint16(b[6:]))
				if b[5]&4 != 0 {
					n = ^uint32(0) - n
				}
				i := uint16(b[2] % ringSize)
				q.setDesc(i, addr, n, uint16(b[8]&7), uint16(b[9]))
				if b[10]&1 != 0 {
					q.offer(i)
				}
			case ringAvail:
				q := []*checkedQueue{tx, rx}[b[1]&1]
				q.availIdx += uint16(int8(b[2]))
				binary.LittleEndian.PutUint16(q.avail[2:], q.availIdx)
				binary.LittleEndian.PutUint16(q.avail[0:], uint16(b[3]))
				copy(q.avail[4+2*ringSize:], b[4:6])
			case ringRunTx:
				tx.run(t, d)
			case ringRunRx:
				for _, h := range rx.run(t, d) {
					if len(ports) < 64 {
						ports = append(ports, h.SrcPort)
					}
				}
			case ringHost:
				switch b[1] % 3 {
				case 0:
					dctx, dcancel := context.WithTimeout(ctx, 50*time.Millisecond)
					go func() {
						defer dcancel()
						if c, err := Dial(dctx, cfg.udsPath, 1024); err == nil {
							c.Close()
						}
					}()
				case 1:
					time.Sleep(time.Duration(b[2]%4) * time.Millisecond)
				}
			case ringPoke:
				off := int(binary.LittleEndian.Uint16(b[1:]))
				copy(whole[off:], b[3:])
			}
			checkMuxerBounds(t, d.mux)
		}
	})
}

// fuzzGuestMemory maps a fresh sealed memfd as guest memory; whole is all of it, as the test writes it.
func fuzzGuestMemory(t *testing.T) (*guestmem.Memory, []byte) {
	t.Helper()
	fd, err := unix.MemfdCreate("vsock-ring-fuzz", unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		t.Fatalf("memfd_create: %v", err)
	}
	if err := unix.Ftruncate(fd, ringMemSize); err != nil {
		unix.Close(fd)
		t.Fatalf("ftruncate: %v", err)
	}
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS, unix.F_SEAL_GROW|unix.F_SEAL_SHRINK|unix.F_SEAL_SEAL); err != nil {
		unix.Close(fd)
		t.Fatalf("seal memfd: %v", err)
	}
	mem, err := guestmem.Map([]guestmem.Region{{GuestPhysAddr: ringMemBase, Size: ringMemSize,
		UserAddr: 0x7f0000000000, FD: fd}}, nil)
	if err != nil {
		t.Fatalf("map guest memory: %v", err)
	}
	t.Cleanup(func() { mem.Close() })
	whole, err := mem.Slice(ringMemBase, ringMemSize)
	if err != nil {
		t.Fatal(err)
	}
	return mem, whole
}

// checkedQueue is the driver's side of one queue (the test writes its descriptors and available ring) and, as
// the device's vq, a real virtqueue.Queue whose every answer and every call of the device's is checked.
type checkedQueue struct {
	t        *testing.T
	name     string
	q        *virtqueue.Queue
	whole    []byte
	desc     []byte
	avail    []byte
	usedOff  uint64
	availIdx uint16
	kicks    chan struct{}

	// One run's record.
	pops        int
	malformed   int                           // ChainErrors Pop returned
	small       int                           // rx chains given back empty for being too small
	outstanding map[uint16][]*virtqueue.Chain // popped and not yet pushed, by head
	refused     map[uint16]int                // malformed chains not yet given back, by head
	writable    [][2]uint64                   // offsets in whole of the rx buffers popped
	packets     []Header                      // packets pushed to the rx queue
}

func newCheckedQueue(t *testing.T, mem *guestmem.Memory, whole []byte, name string, descOff, availOff, usedOff uint64, eventIdx bool) *checkedQueue {
	q, err := virtqueue.New(mem, virtqueue.Config{Size: ringSize, DescAddr: ringMemBase + descOff,
		AvailAddr: ringMemBase + availOff, UsedAddr: ringMemBase + usedOff, EventIdx: eventIdx, KickFD: -1, CallFD: -1})
	if err != nil {
		t.Fatalf("create %s queue: %v", name, err)
	}
	t.Cleanup(q.Close)
	return &checkedQueue{t: t, name: name, q: q, whole: whole, desc: whole[descOff : descOff+16*ringSize],
		avail: whole[availOff : availOff+4+2*ringSize+2], usedOff: usedOff}
}

func (c *checkedQueue) setDesc(i uint16, addr uint64, n uint32, flags, next uint16) {
	b := c.desc[16*int(i%ringSize):]
	binary.LittleEndian.PutUint64(b[0:], addr)
	binary.LittleEndian.PutUint32(b[8:], n)
	binary.LittleEndian.PutUint16(b[12:], flags)
	binary.LittleEndian.PutUint16(b[14:], next)
}

func (c *checkedQueue) offer(head uint16) {
	binary.LittleEndian.PutUint16(c.avail[4+2*int(c.availIdx%ringSize):], head)
	c.availIdx++
	binary.LittleEndian.PutUint16(c.avail[2:], c.availIdx)
}

func (c *checkedQueue) usedIdx() uint16 {
	return binary.LittleEndian.Uint16(c.whole[c.usedOff+2:])
}

// maxPopsPerRun is far more than a run may pop: at most a ring's worth of chains can be pending, plus one empty
// Pop per pass of the rx loop.
const maxPopsPerRun = 64 * ringSize

// run lets the device serve the queue once, from the test's goroutine, as after one kick: tx returns once the
// ring is drained, rx once it has filled what it could. It checks the run and returns the rx packets pushed.
func (c *checkedQueue) run(t *testing.T, d *Device) []Header {
	t.Helper()
	c.pops, c.malformed, c.small = 0, 0, 0
	c.outstanding, c.refused, c.writable, c.packets = map[uint16][]*virtqueue.Chain{}, map[uint16]int{}, nil, nil
	before := bytes.Clone(c.whole)
	metrics := d.Metrics()
	usedBefore := c.usedIdx()
	pushes := 0
	c.kicks = make(chan struct{}, 1)
	c.kicks <- struct{}{}
	close(c.kicks)
	stop := make(chan struct{})
	if c.name == "tx" {
		d.txLoop(stop, &countingVQ{c, &pushes})
	} else {
		close(stop) // the rx loop fills what it can first, then sees stop
		d.rxLoop(stop, &countingVQ{c, &pushes})
	}
	for head, chains := range c.outstanding {
		if len(chains) > 0 {
			t.Fatalf("%s: the device kept %d chain(s) at head %d after its run", c.name, len(chains), head)
		}
	}
	if got := c.usedIdx() - usedBefore; int(got) != pushes%(1<<16) {
		t.Fatalf("%s: used index moved by %d for %d elements pushed", c.name, got, pushes)
	}
	after := d.Metrics()
	malformed := after.MalformedTxChains - metrics.MalformedTxChains
	if c.name == "rx" {
		malformed = after.MalformedRxChains - metrics.MalformedRxChains
	}
	if malformed != uint64(c.malformed) {
		t.Fatalf("%s: %d malformed chains refused, metrics count %d", c.name, c.malformed, malformed)
	}
	if small := after.SmallRxChains - metrics.SmallRxChains; small != uint64(c.small) {
		t.Fatalf("%s: %d rx chains too small given back, metrics count %d", c.name, c.small, small)
	}
	c.checkWrites(t, before)
	return c.packets
}

// checkWrites fails t if the device changed guest memory anywhere but the used rings and the rx buffers the
// driver gave it in this run.
func (c *checkedQueue) checkWrites(t *testing.T, before []byte) {
	t.Helper()
	allowed := append([][2]uint64{{txUsedOff, txUsedOff + usedRingLen}, {rxUsedOff, rxUsedOff + usedRingLen}},
		c.writable...)
	for i := range c.whole {
		if c.whole[i] == before[i] {
			continue
		}
		ok := false
		for _, r := range allowed {
			if uint64(i) >= r[0] && uint64(i) < r[1] {
				ok = true
				break
			}
		}
		if !ok {
			t.Fatalf("%s: the device wrote guest memory at %#x, outside the used rings and the rx buffers", c.name,
				ringMemBase+i)
		}
	}
}

// offsetIn returns where b starts in whole, and fails t unless b lies entirely inside it.
func offsetIn(t *testing.T, whole, b []byte, what string) uint64 {
	t.Helper()
	if len(b) == 0 {
		return 0
	}
	start := uintptr(unsafe.Pointer(unsafe.SliceData(whole)))
	p := uintptr(unsafe.Pointer(unsafe.SliceData(b)))
	if p < start || p-start > uintptr(len(whole)) || uintptr(len(b)) > uintptr(len(whole))-(p-start) {
		t.Fatalf("%s of %d bytes at %#x lies outside guest memory", what, len(b), p)
	}
	return uint64(p - start)
}

// countingVQ is the vq the device sees in a run: the real queue, with every call checked.
type countingVQ struct {
	c      *checkedQueue
	pushes *int
}

func (v *countingVQ) Pop() (*virtqueue.Chain, error) {
	c := v.c
	if c.pops++; c.pops > maxPopsPerRun {
		c.t.Fatalf("%s: more than %d pops in one run: the device loops", c.name, maxPopsPerRun)
	}
	ch, err := c.q.Pop()
	var ce *virtqueue.ChainError
	switch {
	case errors.As(err, &ce):
		c.malformed++
		c.refused[ce.Head]++
		return ch, err
	case err != nil || ch == nil:
		return ch, err
	}
	for _, b := range ch.Readable {
		offsetIn(c.t, c.whole, b, c.name+" readable buffer")
	}
	for _, b := range ch.Writable {
		if off := offsetIn(c.t, c.whole, b, c.name+" writable buffer"); len(b) > 0 && c.name == "rx" {
			c.writable = append(c.writable, [2]uint64{off, off + uint64(len(b))})
		}
	}
	c.outstanding[ch.Head] = append(c.outstanding[ch.Head], ch)
	return ch, nil
}

func (v *countingVQ) Push(head uint16, written uint32) error {
	c := v.c
	if chains := c.outstanding[head]; len(chains) > 0 {
		ch := chains[0]
		c.outstanding[head] = chains[1:]
		c.checkUsed(ch, written)
	} else if c.refused[head] > 0 {
		c.refused[head]--
		if written != 0 {
			c.t.Fatalf("%s: malformed chain at head %d given back with %d bytes written", c.name, head, written)
		}
	} else {
		c.t.Fatalf("%s: pushed head %d, which the device does not hold", c.name, head)
	}
	err := c.q.Push(head, written)
	if err == nil {
		*v.pushes++
	}
	return err
}

// checkUsed checks a used element for ch: nothing written into tx chains; for rx, at most what the buffers hold,
// and then one well-formed packet to the guest.
func (c *checkedQueue) checkUsed(ch *virtqueue.Chain, written uint32) {
	room := iovec(ch.Writable).size()
	if c.name == "tx" {
		if written != 0 {
			c.t.Fatalf("tx: used element for head %d says %d bytes written", ch.Head, written)
		}
		return
	}
	if written == 0 {
		if room <= HeaderSize {
			c.small++
		}
		return
	}
	if uint64(written) > uint64(room) {
		c.t.Fatalf("rx: %d bytes written into a chain of %d", written, room)
	}
	pkt := make([]byte, written)
	iovec(ch.Writable).copyTo(pkt)
	h, err := DecodeHeader(pkt)
	// A RST may come from another CID: the device answers a packet the guest sent to a CID not the host's from
	// that address (rstFor), so that the guest socket which sent it is the one reset.
	if err != nil || h.SrcCID != HostCID && h.Op != OpRst || h.DstCID != testCID || h.Type != TypeStream ||
		uint64(h.Len)+HeaderSize != uint64(written) || h.Len > 0 && h.Op != OpRW {
		c.t.Fatalf("rx: malformed packet %+v (%v) in %d bytes", h, err, written)
	}
	c.packets = append(c.packets, h)
}

func (v *countingVQ) Notify() error          { return v.c.q.Notify() }
func (v *countingVQ) Kicks() <-chan struct{} { return v.c.kicks }

// ringSeeds are step sequences that reach each part of the device and the muxer through the rings.
func ringSeeds() [][]byte {
	step := func(kind byte, args ...byte) []byte {
		b := make([]byte, ringStepLen)
		b[0] = kind
		copy(b[1:], args)
		return b
	}
	pkt := func(op Op, src, dstIdx, flags, bufAlloc, fwd, n, odd, slot, single byte) []byte {
		return step(ringTxPacket, byte(op), src, dstIdx, flags, bufAlloc, fwd, n, odd, slot, single)
	}
	post := func(slot, size, single byte) []byte { return step(ringRxPost, slot, size, single) }
	raw := func(q, i byte, off uint16, kind byte, n uint16, flags, next, offer byte) []byte {
		return step(ringRawDesc, q, i, byte(off), byte(off>>8), kind, byte(n), byte(n>>8), flags, next, offer)
	}
	runTx, runRx := step(ringRunTx), step(ringRunRx)
	sleep := step(ringHost, 1, 3)
	join := func(steps ...[]byte) []byte {
		var b []byte
		for _, s := range steps {
			b = append(b, s...)
		}
		return b
	}
	var flood []byte
	for i := range 12 {
		flood = append(flood, pkt(OpRequest, byte(i), 1, 0, 255, 0, 0, 0, byte(i), 0)...)
		flood = append(flood, runTx...)
	}
	return [][]byte{
		// Connect to the answering port, send, read the answer, shut down.
		join(post(0, 255, 0), post(1, 255, 1), pkt(OpRequest, 1, 2, 0, 255, 0, 0, 0, 0, 0), runTx, sleep, sleep,
			runRx, pkt(OpRW, 1, 2, 0, 255, 0, 40, 0, 1, 1), runTx, sleep, sleep, post(2, 255, 0), post(3, 8, 0), runRx,
			pkt(OpShutdown, 1, 2, 3, 255, 0, 0, 0, 2, 0), runTx, sleep, post(4, 255, 0), runRx),
		// Overrun the stalled port's buffer from two-buffer and one-buffer chains.
		join(pkt(OpRequest, 0, 0, 0, 255, 0, 0, 0, 0, 0), runTx, sleep, post(0, 255, 0), runRx,
			pkt(OpRW, 0, 0, 0, 255, 0, 255, 0, 1, 0), pkt(OpRW, 0, 0, 0, 255, 0, 255, 0, 2, 1),
			pkt(OpRW, 0, 0, 0, 255, 0, 255, 0, 3, 0), runTx, post(1, 255, 0), post(2, 0, 1), post(3, 0, 0), runRx),
		// Malformed chains: a buffer past the end of memory, one before it, a loop, an indirect table of bad
		// length, a writable buffer in a tx chain, a readable one after a writable one in rx, a head out of
		// range, then an available index far ahead.
		join(raw(0, 0, 0x10, 1, 64, 0, 0, 1), raw(0, 1, 0x10, 2, 64, 0, 0, 1), raw(0, 2, 0x2000, 0, 64, descNext, 2, 1),
			raw(0, 3, 0x2000, 0, 17, descIndir, 0, 1), raw(0, 4, 0x2000, 0, 64, descWrite, 0, 1),
			raw(0, 5, 0x10, 3, 0xffff, 0, 0, 1), runTx,
			raw(1, 0, 0xa000, 0, 64, descWrite|descNext, 1, 1), raw(1, 1, 0xa100, 0, 64, 0, 0, 0),
			raw(1, 2, 0xa000, 0, 0, descWrite|4, 0, 1), pkt(OpRst, 0, 1, 0, 0, 0, 0, 0, 4, 0), pkt(OpRW, 0, 1, 0, 0, 0, 0, 0, 5, 0),
			runTx, runRx, step(ringAvail, 0, 100), runTx, step(ringAvail, 1, 0x80), runRx),
		// rx buffers too small for a header, and RSTs waiting for them.
		join(pkt(OpRW, 0, 1, 0, 0, 0, 0, 0, 0, 0), pkt(OpRW, 1, 1, 0, 0, 0, 0, 0, 1, 0), runTx,
			raw(1, 0, 0x9000, 0, 44, descWrite, 0, 1), raw(1, 1, 0x9100, 0, 10, descWrite, 0, 1), runRx, post(2, 1, 0), runRx),
		// Driver-written fields: interrupt suppression, used_event, and bytes poked over a queued packet.
		join(step(ringAvail, 0, 0, 1, 5, 0), pkt(OpRequest, 0, 2, 0, 255, 0, 0, 0, 0, 0),
			step(ringPoke, 0x00, 0x10, 0xff, 0xff, 0xff, 0xff), runTx, step(ringAvail, 1, 0, 0, 0xff, 0xff),
			post(0, 255, 0), runRx),
		// More REQUESTs than maxConns, without rx buffers.
		flood,
	}
}
