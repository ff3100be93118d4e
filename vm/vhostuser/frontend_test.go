package vhostuser

import (
	"context"
	"encoding/binary"
	"net"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kiln-runtime/kiln/vm/virtqueue"
)

// fakeFrontend plays QEMU's part of the protocol over a Unix socket, with a memfd as guest RAM.
type fakeFrontend struct {
	t   *testing.T
	c   *net.UnixConn
	mem []byte // the frontend's own mapping of guest RAM
	fd  int    // memfd of guest RAM
}

const (
	feMemSize  = 1 << 20
	feUserAddr = 0x7f0000000000 // where "QEMU" has guest RAM; guest physical 0
	feRingSize = 8
)

// ring layout for ring i, in guest physical addresses.
func feDesc(i int) uint64  { return uint64(0x4000 * i) }
func feAvail(i int) uint64 { return feDesc(i) + 16*feRingSize }
func feUsed(i int) uint64  { return feDesc(i) + 0x1000 }
func feData(i int) uint64  { return 0x40000 + uint64(0x1000*i) }

// startServe runs Serve on a fresh socket and connects a fake frontend to it.
func startServe(t *testing.T, ctx context.Context, dev Device) (*fakeFrontend, <-chan error) {
	t.Helper()
	return startServeBounded(t, ctx, dev, GuestRAM{})
}

// startServeBounded is startServe with Serve bounded by ram.
func startServeBounded(t *testing.T, ctx context.Context, dev Device, ram GuestRAM) (*fakeFrontend, <-chan error) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "vu.sock")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	errc := make(chan error, 1)
	go func() { errc <- Serve(ctx, l, dev, ram, nil) }()
	c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	fd, err := unix.MemfdCreate("fake-guest-ram", unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Ftruncate(fd, feMemSize); err != nil {
		t.Fatal(err)
	}
	// Sealed as QEMU's memory-backend-memfd seals guest RAM by default.
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS, unix.F_SEAL_GROW|unix.F_SEAL_SHRINK|unix.F_SEAL_SEAL); err != nil {
		t.Fatal(err)
	}
	mem, err := unix.Mmap(fd, 0, feMemSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Munmap(mem); unix.Close(fd) })
	return &fakeFrontend{t: t, c: c, mem: mem, fd: fd}, errc
}

func (f *fakeFrontend) send(req request, flags uint32, payload []byte, fds ...int) {
	f.t.Helper()
	b := make([]byte, headerSize+len(payload))
	encodeHeader(b, header{req: req, flags: flagVersion | flags, size: uint32(len(payload))})
	copy(b[headerSize:], payload)
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	if _, _, err := f.c.WriteMsgUnix(b, oob, nil); err != nil {
		f.t.Fatalf("send %v: %v", req, err)
	}
}

// recv reads the reply to req.
func (f *fakeFrontend) recv(req request) []byte {
	f.t.Helper()
	f.c.SetReadDeadline(time.Now().Add(10 * time.Second))
	hb := make([]byte, headerSize)
	if _, err := readFull(f.c, hb); err != nil {
		f.t.Fatalf("read reply header to %v: %v", req, err)
	}
	h, err := decodeHeader(hb)
	if err != nil {
		f.t.Fatalf("reply to %v: %v", req, err)
	}
	if h.req != req || h.flags&flagReply == 0 {
		f.t.Fatalf("reply to %v has request %v flags %#x", req, h.req, h.flags)
	}
	p := make([]byte, h.size)
	if _, err := readFull(f.c, p); err != nil {
		f.t.Fatalf("read reply payload to %v: %v", req, err)
	}
	return p
}

func readFull(c *net.UnixConn, b []byte) (int, error) {
	n := 0
	for n < len(b) {
		m, err := c.Read(b[n:])
		n += m
		if err != nil {
			return n, err
		}
	}
	return n, nil
}

// call sends a request with a reply of its own and returns the reply.
func (f *fakeFrontend) call(req request, payload []byte) []byte {
	f.t.Helper()
	f.send(req, 0, payload)
	return f.recv(req)
}

// acked sends req asking for a REPLY_ACK and returns the status.
func (f *fakeFrontend) acked(req request, payload []byte, fds ...int) uint64 {
	f.t.Helper()
	f.send(req, flagNeedReply, payload, fds...)
	p := f.recv(req)
	if len(p) != 8 {
		f.t.Fatalf("ack to %v has %d bytes", req, len(p))
	}
	return binary.LittleEndian.Uint64(p)
}

func (f *fakeFrontend) mustAck(req request, payload []byte, fds ...int) {
	f.t.Helper()
	if st := f.acked(req, payload, fds...); st != 0 {
		f.t.Fatalf("%v failed with status %d", req, st)
	}
}

func (f *fakeFrontend) memTable() []byte {
	p := make([]byte, 8+32)
	binary.LittleEndian.PutUint32(p, 1)
	binary.LittleEndian.PutUint64(p[8:], 0)           // guest address
	binary.LittleEndian.PutUint64(p[16:], feMemSize)  // size
	binary.LittleEndian.PutUint64(p[24:], feUserAddr) // user address
	binary.LittleEndian.PutUint64(p[32:], 0)          // mmap offset
	return p
}

func vringAddrPayload(i int) []byte {
	p := make([]byte, 40)
	binary.LittleEndian.PutUint32(p[0:], uint32(i))
	binary.LittleEndian.PutUint64(p[8:], feUserAddr+feDesc(i))
	binary.LittleEndian.PutUint64(p[16:], feUserAddr+feUsed(i))
	binary.LittleEndian.PutUint64(p[24:], feUserAddr+feAvail(i))
	return p
}

func stateMsg(i, num uint32) []byte { return encodeVringState(vringState{index: i, num: num}) }

func newEventfd(t *testing.T) int {
	t.Helper()
	fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	return fd
}

// offerChain puts a one-descriptor device-writable chain on ring i's available ring, as a driver would.
func (f *fakeFrontend) offerChain(i int, head uint16, availIdx uint16) {
	d := f.mem[feDesc(i)+16*uint64(head):]
	binary.LittleEndian.PutUint64(d[0:], feData(i))
	binary.LittleEndian.PutUint32(d[8:], 64)
	binary.LittleEndian.PutUint16(d[12:], 2) // VIRTQ_DESC_F_WRITE
	a := f.mem[feAvail(i):]
	binary.LittleEndian.PutUint16(a[4+2*uint64((availIdx-1)%feRingSize):], head)
	binary.LittleEndian.PutUint16(a[2:], availIdx)
}

func (f *fakeFrontend) usedIdx(i int) uint16 {
	return binary.LittleEndian.Uint16(f.mem[feUsed(i)+2:])
}

// fakeDevice answers every chain with 5 written bytes and reports what happens on events.
type fakeDevice struct {
	features uint64
	config   []byte
	events   chan string
	wg       sync.WaitGroup
}

func newFakeDevice() *fakeDevice {
	return &fakeDevice{features: 1 << 0, config: []byte{3, 0, 0, 0, 0, 0, 0, 0}, events: make(chan string, 100)}
}

func (d *fakeDevice) NumQueues() int   { return 2 }
func (d *fakeDevice) Features() uint64 { return d.features }
func (d *fakeDevice) Config() []byte   { return d.config }

func (d *fakeDevice) Start(queues []*virtqueue.Queue) error {
	d.events <- "start"
	for i, q := range queues {
		d.wg.Add(1)
		go func() {
			defer d.wg.Done()
			for range q.Kicks() {
				for {
					c, err := q.Pop()
					if err != nil || c == nil {
						break
					}
					copy(c.Writable[0], "hello")
					q.Push(c.Head, 5)
				}
				q.Notify()
				d.events <- "kick " + string(rune('0'+i))
			}
		}()
	}
	return nil
}

func (d *fakeDevice) Stop() {
	d.wg.Wait()
	d.events <- "stop"
}

// expect waits for the next device event.
func (d *fakeDevice) expect(t *testing.T, want ...string) {
	t.Helper()
	got := map[string]int{}
	for _, w := range want {
		got[w]++
	}
	for range want {
		select {
		case e := <-d.events:
			if got[e] == 0 {
				t.Fatalf("device event %q, want one of %v", e, want)
			}
			got[e]--
		case <-time.After(10 * time.Second):
			t.Fatalf("no device event, want %v", want)
		}
	}
}

func (d *fakeDevice) expectNone(t *testing.T) {
	t.Helper()
	select {
	case e := <-d.events:
		t.Fatalf("unexpected device event %q", e)
	case <-time.After(50 * time.Millisecond):
	}
}

func netListen(t *testing.T) (*net.UnixListener, error) {
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: filepath.Join(t.TempDir(), "vu.sock"), Net: "unix"})
	if err == nil {
		t.Cleanup(func() { l.Close() })
	}
	return l, err
}
