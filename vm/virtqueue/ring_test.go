package virtqueue

import (
	"encoding/binary"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/kiln-runtime/kiln/vm/guestmem"
)

// Test guest memory: one 64 KiB region at memBase; the ring sits at its start, buffers from dataBase.
const (
	memBase   = 0x10000
	memSize   = 0x10000
	testSize  = 8
	descAddr  = memBase
	availAddr = memBase + 16*testSize
	usedAddr  = memBase + 0x1000
	dataBase  = memBase + 0x4000
)

// testRing is a driver-side view of a split ring built by hand in a memfd.
type testRing struct {
	t        *testing.T
	mem      *guestmem.Memory
	availIdx uint16
}

func newTestMemory(t *testing.T) *guestmem.Memory {
	t.Helper()
	fd, err := unix.MemfdCreate("virtqueue-test", unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		t.Fatalf("memfd_create: %v", err)
	}
	if err := unix.Ftruncate(fd, memSize); err != nil {
		t.Fatalf("ftruncate: %v", err)
	}
	// Sealed as QEMU seals guest RAM; guestmem refuses memory that could shrink under its mapping.
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS, unix.F_SEAL_GROW|unix.F_SEAL_SHRINK|unix.F_SEAL_SEAL); err != nil {
		t.Fatalf("seal memfd: %v", err)
	}
	mem, err := guestmem.Map([]guestmem.Region{{GuestPhysAddr: memBase, Size: memSize, UserAddr: 0x7f0000000000, FD: fd}}, nil)
	if err != nil {
		t.Fatalf("map: %v", err)
	}
	t.Cleanup(func() { mem.Close() })
	return mem
}

func newTestRing(t *testing.T) *testRing {
	return &testRing{t: t, mem: newTestMemory(t)}
}

func (r *testRing) bytes(gpa, n uint64) []byte {
	b, err := r.mem.Slice(gpa, n)
	if err != nil {
		r.t.Fatalf("test ring slice %#x+%d: %v", gpa, n, err)
	}
	return b
}

// setDesc writes descriptor i of the table at table.
func (r *testRing) setDesc(table uint64, i uint16, addr uint64, n uint32, flags, next uint16) {
	b := r.bytes(table+16*uint64(i), 16)
	binary.LittleEndian.PutUint64(b[0:], addr)
	binary.LittleEndian.PutUint32(b[8:], n)
	binary.LittleEndian.PutUint16(b[12:], flags)
	binary.LittleEndian.PutUint16(b[14:], next)
}

// offer makes head available.
func (r *testRing) offer(head uint16) {
	binary.LittleEndian.PutUint16(r.bytes(availAddr+4+2*uint64(r.availIdx%testSize), 2), head)
	r.availIdx++
	binary.LittleEndian.PutUint16(r.bytes(availAddr+2, 2), r.availIdx)
}

func (r *testRing) setAvailFlags(f uint16) { binary.LittleEndian.PutUint16(r.bytes(availAddr, 2), f) }
func (r *testRing) setUsedEvent(v uint16) {
	binary.LittleEndian.PutUint16(r.bytes(availAddr+4+2*testSize, 2), v)
}
func (r *testRing) availEvent() uint16 {
	return binary.LittleEndian.Uint16(r.bytes(usedAddr+4+8*testSize, 2))
}
func (r *testRing) usedIdx() uint16 { return binary.LittleEndian.Uint16(r.bytes(usedAddr+2, 2)) }
func (r *testRing) usedElem(i uint16) (id, n uint32) {
	b := r.bytes(usedAddr+4+8*uint64(i%testSize), 8)
	return binary.LittleEndian.Uint32(b), binary.LittleEndian.Uint32(b[4:])
}

// fill writes s at gpa.
func (r *testRing) fill(gpa uint64, s string) { copy(r.bytes(gpa, uint64(len(s))), s) }

func eventfd(t *testing.T) int {
	t.Helper()
	fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		t.Fatalf("eventfd: %v", err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	return fd
}

// signalled reads (and resets) an eventfd, reporting whether it had been written.
func signalled(t *testing.T, fd int) bool {
	t.Helper()
	var b [8]byte
	_, err := unix.Read(fd, b[:])
	if err == unix.EAGAIN {
		return false
	}
	if err != nil {
		t.Fatalf("read eventfd: %v", err)
	}
	return true
}

func (r *testRing) queue(eventIdx bool, kick, call int) *Queue {
	r.t.Helper()
	q, err := New(r.mem, Config{Size: testSize, DescAddr: descAddr, AvailAddr: availAddr, UsedAddr: usedAddr,
		EventIdx: eventIdx, KickFD: kick, CallFD: call})
	if err != nil {
		r.t.Fatalf("New: %v", err)
	}
	r.t.Cleanup(q.Close)
	return q
}
