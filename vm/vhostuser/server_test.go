package vhostuser

import (
	"context"
	"encoding/binary"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kiln-runtime/kiln/vm/guestmem"
)

func u64(v uint64) []byte { return encodeU64(v) }

// runRings negotiates without protocol features (so that the rings start enabled), sets both rings up and waits
// for dev to start and take their first kicks; it returns the kick eventfds.
func runRings(t *testing.T, f *fakeFrontend, dev *fakeDevice) [2]int {
	t.Helper()
	handshake(t, f)
	f.mustAck(reqSetFeatures, u64(FeatureVersion1))
	kicks := [2]int{newEventfd(t), newEventfd(t)}
	setupRings(t, f, kicks, [2]int{newEventfd(t), newEventfd(t)})
	dev.expect(t, "start")
	dev.expect(t, "kick 0", "kick 1")
	return kicks
}

// handshake performs QEMU's realize-time negotiation and returns the offered features.
func handshake(t *testing.T, f *fakeFrontend) uint64 {
	t.Helper()
	features := binary.LittleEndian.Uint64(f.call(reqGetFeatures, nil))
	proto := binary.LittleEndian.Uint64(f.call(reqGetProtocolFeatures, nil))
	if proto&protoFeatureConfig == 0 || proto&protoFeatureReplyAck == 0 {
		t.Fatalf("protocol features %#x lack CONFIG or REPLY_ACK", proto)
	}
	f.send(reqSetProtocolFeatures, 0, u64(protoFeatureConfig|protoFeatureReplyAck))
	f.mustAck(reqSetOwner, nil)
	return features
}

// setupRings sends QEMU's start sequence for both rings, without enabling them.
func setupRings(t *testing.T, f *fakeFrontend, kicks, calls [2]int) {
	t.Helper()
	f.mustAck(reqSetMemTable, f.memTable(), f.fd)
	for i := range 2 {
		f.mustAck(reqSetVringNum, stateMsg(uint32(i), feRingSize))
		f.mustAck(reqSetVringBase, stateMsg(uint32(i), 0))
		f.mustAck(reqSetVringAddr, vringAddrPayload(i))
		f.mustAck(reqSetVringKick, u64(uint64(i)), kicks[i])
		f.mustAck(reqSetVringCall, u64(uint64(i)), calls[i])
		f.mustAck(reqSetVringErr, u64(uint64(i)), newEventfd(t))
	}
}

func TestFullSetupKickAndStop(t *testing.T) {
	dev := newFakeDevice()
	f, errc := startServe(t, context.Background(), dev)

	features := handshake(t, f)
	for _, bit := range []uint64{FeatureVersion1, FeatureProtocolFeatures, FeatureRingEventIdx, FeatureRingIndirectDesc, 1} {
		if features&bit == 0 {
			t.Fatalf("features %#x lack %#x", features, bit)
		}
	}
	if n := binary.LittleEndian.Uint64(f.call(reqGetQueueNum, nil)); n != 2 {
		t.Fatalf("GET_QUEUE_NUM = %d", n)
	}
	cfg := f.call(reqGetConfig, encodeConfig(configSpace{size: 8, data: make([]byte, 8)}))
	if want := encodeConfig(configSpace{size: 8, data: dev.config}); string(cfg) != string(want) {
		t.Fatalf("GET_CONFIG = %x, want %x", cfg, want)
	}

	f.mustAck(reqSetFeatures, u64(FeatureVersion1|FeatureProtocolFeatures|FeatureRingEventIdx))
	kicks := [2]int{newEventfd(t), newEventfd(t)}
	calls := [2]int{newEventfd(t), newEventfd(t)}
	setupRings(t, f, kicks, calls)
	// With VHOST_USER_F_PROTOCOL_FEATURES the rings start disabled.
	dev.expectNone(t)

	f.mustAck(reqSetVringEnable, stateMsg(0, 1))
	dev.expectNone(t)
	f.mustAck(reqSetVringEnable, stateMsg(1, 1))
	dev.expect(t, "start")
	dev.expect(t, "kick 0", "kick 1") // the queues' initial kicks

	// The driver offers a buffer on ring 1 and kicks: the device fills it and interrupts.
	f.offerChain(1, 3, 1)
	unix.Write(kicks[1], u64(1))
	dev.expect(t, "kick 1")
	if got := f.usedIdx(1); got != 1 {
		t.Fatalf("ring 1 used idx %d after the kick, want 1", got)
	}
	if got := string(f.mem[feData(1) : feData(1)+5]); got != "hello" {
		t.Fatalf("guest buffer holds %q", got)
	}
	var b [8]byte
	if _, err := unix.Read(calls[1], b[:]); err != nil {
		t.Fatalf("call eventfd of ring 1 not signalled: %v", err)
	}

	// QEMU stops the rings with GET_VRING_BASE: the device stops and the positions come back.
	st, err := decodeVringState(f.call(reqGetVringBase, stateMsg(1, 0)))
	if err != nil || st.index != 1 || st.num != 1 {
		t.Fatalf("GET_VRING_BASE(1) = %+v, %v; want index 1 num 1", st, err)
	}
	dev.expect(t, "stop")
	st, _ = decodeVringState(f.call(reqGetVringBase, stateMsg(0, 0)))
	if st.num != 0 {
		t.Fatalf("GET_VRING_BASE(0) = %+v", st)
	}

	// Restart as QEMU does: base, kick again; the device starts again.
	for i := range 2 {
		f.mustAck(reqSetVringBase, stateMsg(uint32(i), uint32([]int{0, 1}[i])))
		f.mustAck(reqSetVringKick, u64(uint64(i)), kicks[i])
	}
	dev.expect(t, "start")
	dev.expect(t, "kick 0", "kick 1")

	f.c.Close()
	dev.expect(t, "stop")
	select {
	case err := <-errc:
		if err != nil {
			t.Fatalf("Serve after disconnect: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Serve did not return after disconnect")
	}
}

func TestRingsEnabledWithoutProtocolFeatures(t *testing.T) {
	dev := newFakeDevice()
	f, _ := startServe(t, context.Background(), dev)
	handshake(t, f)
	f.mustAck(reqSetFeatures, u64(FeatureVersion1))
	setupRings(t, f, [2]int{newEventfd(t), newEventfd(t)}, [2]int{newEventfd(t), newEventfd(t)})
	dev.expect(t, "start")
}

// Serve's grant bounds the guest memory the device reaches through its queues: a buffer in a block more than it
// grants is refused, nothing is written there and no chain is used.
func TestGrantBoundsTheDevicesBuffers(t *testing.T) {
	// The rings lie in the first 0x8000 bytes, ring 1's data buffer in the block at feData(1).
	const block = 0x1000
	for _, tc := range []struct {
		name    string
		granted uint64
		filled  bool
	}{
		{"one block more granted", 0x8000 + block, true},
		{"none", 0x8000, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dev := newFakeDevice()
			grant := guestmem.NewGrant(0x8000, block, feMemSize)
			grant.Raise(tc.granted)
			f, _ := startServeBounded(t, context.Background(), dev, GuestRAM{Grant: grant})
			kicks := runRings(t, f, dev)
			f.offerChain(1, 3, 1)
			unix.Write(kicks[1], u64(1))
			dev.expect(t, "kick 1")
			got := string(f.mem[feData(1) : feData(1)+5])
			if filled := got == "hello" && f.usedIdx(1) == 1; filled != tc.filled {
				t.Errorf("with %#x granted, the buffer at %#x holds %q, used idx %d; want filled %v",
					tc.granted, feData(1), got, f.usedIdx(1), tc.filled)
			}
		})
	}
}

func TestSetCallWhileRunningIsFollowed(t *testing.T) {
	dev := newFakeDevice()
	f, _ := startServe(t, context.Background(), dev)
	kicks := runRings(t, f, dev)
	call := newEventfd(t)
	f.mustAck(reqSetVringCall, u64(0), call)
	dev.expectNone(t) // no restart
	f.offerChain(0, 0, 1)
	unix.Write(kicks[0], u64(1))
	dev.expect(t, "kick 0")
	var b [8]byte
	if _, err := unix.Read(call, b[:]); err != nil {
		t.Fatalf("new call fd not signalled: %v", err)
	}
}

func TestRequestsRefusedCleanly(t *testing.T) {
	tests := []struct {
		name    string
		req     request
		payload []byte
		fds     int  // eventfds to attach
		pipe    bool // attach a pipe instead: a ring descriptor that is no eventfd
	}{
		{"unknown request", 99, nil, 0, false},
		{"unoffered feature", reqSetFeatures, u64(1 << 5), 0, false},
		{"unoffered protocol feature", reqSetProtocolFeatures, u64(1 << 0), 0, false},
		{"read-only config", reqSetConfig, encodeConfig(configSpace{size: 1, data: []byte{7}}), 0, false},
		{"vring index out of range", reqSetVringNum, stateMsg(2, 8), 0, false},
		{"vring size not a power of two", reqSetVringNum, stateMsg(0, 7), 0, false},
		{"kick without fd", reqSetVringKick, u64(0), 0, false},
		{"short payload", reqSetVringAddr, make([]byte, 10), 0, false},
		{"memory table without fds", reqSetMemTable, (&fakeFrontend{}).memTable(), 0, false},
		{"log base (not offered)", reqSetLogBase, make([]byte, 16), 1, false},
		{"kick that is no eventfd", reqSetVringKick, u64(0), 0, true},
		{"call that is no eventfd", reqSetVringCall, u64(1), 0, true},
		{"err that is no eventfd", reqSetVringErr, u64(0), 0, true},
	}
	dev := newFakeDevice()
	f, errc := startServe(t, context.Background(), dev)
	handshake(t, f)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var fds []int
			for range tt.fds {
				fds = append(fds, newEventfd(t))
			}
			if tt.pipe {
				var p [2]int
				if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { unix.Close(p[0]); unix.Close(p[1]) })
				fds = append(fds, p[1])
			}
			f.t = t
			if st := f.acked(tt.req, tt.payload, fds...); st == 0 {
				t.Fatal("request acknowledged as successful")
			}
		})
	}
	f.t = t
	// The session survived every refusal.
	if n := binary.LittleEndian.Uint64(f.call(reqGetQueueNum, nil)); n != 2 {
		t.Fatalf("GET_QUEUE_NUM = %d", n)
	}
	// An unknown request nobody waits an acknowledgement for ends the session with an error naming it.
	f.send(99, 0, []byte{1, 2, 3})
	select {
	case err := <-errc:
		if err == nil || !strings.Contains(err.Error(), "request(99)") {
			t.Fatalf("Serve = %v, want an error naming request(99)", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Serve kept going after an unknown request")
	}
}

func TestGetConfigWindows(t *testing.T) {
	dev := newFakeDevice()
	dev.config = []byte{1, 2, 3, 4, 5, 6, 7, 8}
	f, _ := startServe(t, context.Background(), dev)
	handshake(t, f)
	tests := []struct {
		offset, size uint32
		want         []byte // payload after the 12-byte config header; nil means the empty failure reply
	}{
		{0, 8, []byte{1, 2, 3, 4, 5, 6, 7, 8}},
		{4, 2, []byte{5, 6}},
		{6, 4, []byte{7, 8, 0, 0}},
		{100, 2, []byte{0, 0}},
		{0, 300, nil},
	}
	for _, tt := range tests {
		p := f.call(reqGetConfig, encodeConfig(configSpace{offset: tt.offset, size: tt.size, data: make([]byte, tt.size)}))
		if tt.want == nil {
			if len(p) != 0 {
				t.Errorf("GET_CONFIG(%d, %d) = %x, want empty", tt.offset, tt.size, p)
			}
			continue
		}
		c, err := decodeConfig(p)
		if err != nil || c.offset != tt.offset || string(c.data) != string(tt.want) {
			t.Errorf("GET_CONFIG(%d, %d) = %+v, %v; want %x", tt.offset, tt.size, c, err, tt.want)
		}
	}
}

func TestServeStopsOnContext(t *testing.T) {
	t.Run("while accepting", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		l, err := netListen(t)
		if err != nil {
			t.Fatal(err)
		}
		errc := make(chan error, 1)
		go func() { errc <- Serve(ctx, l, newFakeDevice(), GuestRAM{}, nil) }()
		time.Sleep(20 * time.Millisecond)
		cancel()
		select {
		case err := <-errc:
			if err != context.Canceled {
				t.Fatalf("Serve = %v, want context.Canceled", err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("Serve did not return")
		}
	})
	t.Run("while running", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		dev := newFakeDevice()
		f, errc := startServe(t, ctx, dev)
		handshake(t, f)
		f.mustAck(reqSetFeatures, u64(FeatureVersion1))
		setupRings(t, f, [2]int{newEventfd(t), newEventfd(t)}, [2]int{newEventfd(t), newEventfd(t)})
		dev.expect(t, "start")
		cancel()
		select {
		case err := <-errc:
			if err != context.Canceled {
				t.Fatalf("Serve = %v, want context.Canceled", err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("Serve did not return")
		}
		dev.expect(t, "kick 0", "kick 1", "stop")
	})
}

// TestMemoryTableMustNotShrink pins the vhost-user side of finding 11 of issue 11: guest RAM whose file could
// be truncated under our mapping is refused, unless the VM's RAM is a file by configuration.
func TestMemoryTableMustNotShrink(t *testing.T) {
	unsealed := func(t *testing.T) int {
		fd, err := unix.MemfdCreate("unsealed-guest-ram", unix.MFD_CLOEXEC)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { unix.Close(fd) })
		if err := unix.Ftruncate(fd, feMemSize); err != nil {
			t.Fatal(err)
		}
		return fd
	}
	tests := []struct {
		name   string
		fd     func(t *testing.T, f *fakeFrontend) int
		wantOK bool
	}{
		{"sealed memfd", func(_ *testing.T, f *fakeFrontend) int { return f.fd }, true},
		{"unsealed memfd", func(t *testing.T, _ *fakeFrontend) int { return unsealed(t) }, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f, _ := startServe(t, context.Background(), newFakeDevice())
			handshake(t, f)
			if st := f.acked(reqSetMemTable, f.memTable(), tt.fd(t, f)); (st == 0) != tt.wantOK {
				t.Fatalf("SET_MEM_TABLE status %d, want success %v", st, tt.wantOK)
			}
		})
	}
}

// A memory table holding more than the VM's memory is refused: a front end (a QEMU taken over) could otherwise
// grow its memfd and have this process map and fault in any amount of memory, outside the VM's cgroup.
func TestMemoryTableBoundedByTheVMsMemory(t *testing.T) {
	for _, tc := range []struct {
		name   string
		bytes  uint64
		wantOK bool
	}{
		{"the VM's memory", feMemSize, true},
		{"no bound", 0, true},
		{"more than the VM's memory", feMemSize - 4096, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f, _ := startServeBounded(t, context.Background(), newFakeDevice(), GuestRAM{Bytes: tc.bytes})
			handshake(t, f)
			if st := f.acked(reqSetMemTable, f.memTable(), f.fd); (st == 0) != tc.wantOK {
				t.Fatalf("SET_MEM_TABLE of %#x bytes with %#x: status %d, want success %v", feMemSize, tc.bytes, st, tc.wantOK)
			}
		})
	}
}

// A front end that fills a call eventfd it made blocking holds the device's write to it: the device goes on, and
// the next start is refused while that write is held (each start would leave another write held), then
// allowed once the front end reads the eventfd.
func TestHeldCallWriteRefusesRestart(t *testing.T) {
	dev := newFakeDevice()
	f, _ := startServe(t, context.Background(), dev)
	handshake(t, f)
	f.mustAck(reqSetFeatures, u64(FeatureVersion1))
	held, err := unix.Eventfd(0, unix.EFD_CLOEXEC) // blocking
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(held) })
	unix.Write(held, u64(0xfffffffffffffffe))
	kicks := [2]int{newEventfd(t), newEventfd(t)}
	setupRings(t, f, kicks, [2]int{newEventfd(t), held})
	dev.expect(t, "start")
	dev.expect(t, "kick 0", "kick 1")
	f.offerChain(1, 3, 1)
	unix.Write(kicks[1], u64(1))
	dev.expect(t, "kick 1") // the device's Notify returned, its write held
	for i := range 2 {
		f.call(reqGetVringBase, stateMsg(uint32(i), 0))
	}
	dev.expect(t, "stop")
	restart := func() uint64 {
		f.mustAck(reqSetVringBase, stateMsg(0, 0))
		f.mustAck(reqSetVringKick, u64(0), kicks[0])
		f.mustAck(reqSetVringBase, stateMsg(1, 1))
		return f.acked(reqSetVringKick, u64(1), kicks[1])
	}
	if st := restart(); st == 0 {
		t.Fatal("the device restarted while a write to its call eventfd was held")
	}
	dev.expectNone(t)
	var b [8]byte
	unix.Read(held, b[:]) // the front end reads: the held write goes through
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if st := f.acked(reqSetVringKick, u64(1), kicks[1]); st == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the device does not start 10 s after the front end read its call eventfd")
		}
	}
	dev.expect(t, "start")
}
