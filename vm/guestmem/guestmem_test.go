package guestmem

import (
	"errors"
	"math/bits"
	"sync"
	"sync/atomic"
	"testing"

	"golang.org/x/sys/unix"
)

// memfd returns a memfd of size bytes whose byte i is byte(i*7+seed), sealed as QEMU seals guest RAM.
func memfd(t *testing.T, size int, seed byte) int {
	t.Helper()
	fd, err := unix.MemfdCreate("guestmem-test", unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		t.Fatalf("memfd_create: %v", err)
	}
	buf := make([]byte, size)
	for i := range buf {
		buf[i] = pattern(i, seed)
	}
	if _, err := unix.Pwrite(fd, buf, 0); err != nil {
		t.Fatalf("fill memfd: %v", err)
	}
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS, qemuSeals); err != nil {
		t.Fatalf("seal memfd: %v", err)
	}
	return fd
}

func pattern(i int, seed byte) byte { return byte(i*7) + seed }

func fdOpen(fd int) bool {
	_, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0)
	return err == nil
}

const page = 4096

// twoRegions maps 4 pages at gpa 0 (uva 0x7f0000000000) and 2 pages at gpa 0x100000 whose file data starts at
// a non-page-aligned offset of 0x1010 (uva 0x7f1000000000).
func twoRegions(t *testing.T) *Memory { return twoRegionsGranted(t, nil) }

// twoRegionsGranted is twoRegions with grant, the higher region given first as QEMU may.
func twoRegionsGranted(t *testing.T, grant *Grant) *Memory {
	t.Helper()
	m, err := Map([]Region{
		{GuestPhysAddr: 0x100000, Size: 2 * page, UserAddr: 0x7f1000000000, MmapOffset: 0x1010,
			FD: memfd(t, 4*page, 100)},
		{GuestPhysAddr: 0, Size: 4 * page, UserAddr: 0x7f0000000000, FD: memfd(t, 4*page, 0)},
	}, grant)
	if err != nil {
		t.Fatalf("Map: %v", err)
	}
	t.Cleanup(func() {
		if err := m.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return m
}

func TestSliceTranslatesAndBoundsChecks(t *testing.T) {
	m := twoRegions(t)
	tests := []struct {
		name  string
		gpa   uint64
		n     uint64
		ok    bool
		first byte // expected first byte when ok and n > 0
	}{
		{"start of region 0", 0, 16, true, 0},
		{"inside region 0", 100, 10, true, pattern(100, 0)},
		{"whole region 0", 0, 4 * page, true, 0},
		{"last byte of region 0", 4*page - 1, 1, true, pattern(4*page-1, 0)},
		{"crosses end of region 0", 4*page - 1, 2, false, 0},
		{"just past region 0", 4 * page, 1, false, 0},
		{"gap between regions", 0x80000, 1, false, 0},
		{"region 1 honours mmap offset", 0x100000, 4, true, pattern(0x1010, 100)},
		{"region 1 end", 0x100000 + 2*page - 8, 8, true, pattern(0x1010+2*page-8, 100)},
		{"past region 1", 0x100000 + 2*page - 8, 9, false, 0},
		{"huge length overflows", 8, ^uint64(0), false, 0},
		{"huge address", ^uint64(0) - 1, 1, false, 0},
		{"zero length inside", 8, 0, true, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b, err := m.Slice(tt.gpa, tt.n)
			if !tt.ok {
				if err == nil || !errors.Is(err, ErrOutOfRange) {
					t.Fatalf("Slice(%#x, %#x) = len %d, %v; want ErrOutOfRange", tt.gpa, tt.n, len(b), err)
				}
				return
			}
			if err != nil {
				t.Fatalf("Slice(%#x, %#x): %v", tt.gpa, tt.n, err)
			}
			if uint64(len(b)) != tt.n || uint64(cap(b)) != tt.n {
				t.Fatalf("len %d cap %d, want %d", len(b), cap(b), tt.n)
			}
			if tt.n > 0 && b[0] != tt.first {
				t.Fatalf("first byte %d, want %d", b[0], tt.first)
			}
		})
	}
}

// A grant hands out the blocks the guest booted with and as many more as it grants, whichever the guest reaches
// first, wherever they lie; past that count nothing new, until the grant is raised.
func TestSliceHonoursGrant(t *testing.T) {
	const block = page / 2
	// The guest booted with the first page (two blocks); the regions end below 0x100000+2 pages.
	grant := NewGrant(page, block, 0x100000+2*page)
	m := twoRegionsGranted(t, grant)
	tests := []struct {
		name  string
		grant uint64
		gpa   uint64
		n     uint64
		ok    bool
	}{
		{"the boot memory", page, 0, page, true},
		{"a block more, none granted", page, page, 1, false},
		{"the boot memory again", page, 8, 16, true},
		{"one more block granted, reached high", page + block, 0x100000 + page, block, true},
		{"that block again", page + block, 0x100000 + page + 8, 8, true},
		{"the block below it, not granted", page + block, 0x100000, 1, false},
		{"a range over a reached block and a new one, one granted", page + 2*block, 0x100000 + page - 8, 16, true},
		{"two new blocks, one granted", page + 3*block, 2 * page, block + 1, false},
		{"the same, two granted", page + 4*block, 2 * page, block + 1, true},
		{"a zero-length slice claims nothing", page + 4*block, 3 * page, 0, true},
		{"a lower grant takes nothing back", page, 2 * page, block + 1, true},
		{"and grants nothing more", page, 3 * page, 1, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			grant.Raise(tt.grant)
			_, err := m.Slice(tt.gpa, tt.n)
			if tt.ok && err != nil {
				t.Fatalf("Slice(%#x, %#x) with %d granted: %v", tt.gpa, tt.n, grant.Bytes(), err)
			}
			if !tt.ok && !errors.Is(err, ErrOutOfRange) {
				t.Fatalf("Slice(%#x, %#x) with %d granted = %v; want ErrOutOfRange", tt.gpa, tt.n, grant.Bytes(), err)
			}
		})
	}
}

// Concurrent first touches of new blocks never reach more blocks than granted, and nothing at or past the end the
// grant was made for is handed out, even with blocks to spare.
func TestGrantCountsConcurrentTouches(t *testing.T) {
	const block = 16
	grant := NewGrant(0, block, 64*block)
	grant.Raise(10 * block)
	var wg sync.WaitGroup
	var allowed atomic.Int64
	for b := range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// Two blocks each, overlapping their neighbours'.
			if grant.allows(uint64(b)*block+block/2, block) {
				allowed.Add(1)
			}
		}()
	}
	wg.Wait()
	var set int
	for i := range grant.reached {
		set += bits.OnesCount64(grant.reached[i].Load())
	}
	// Each range allowed reached at most two new blocks: at least five were allowed before ten were reached.
	if got := allowed.Load(); got < 5 || grant.count > 10 || uint64(set) != grant.count {
		t.Errorf("%d ranges allowed, %d blocks counted, %d marked, with 10 granted", got, grant.count, set)
	}

	end := NewGrant(0, block, 100*block+1) // 101 blocks, the last one partly below end
	end.Raise(1 << 20)
	if !end.allows(100*block, 1) {
		t.Error("the block end lies in was refused")
	}
	if end.allows(101*block, 1) || end.allows(100*block+8, block) {
		t.Error("a block past the grant's end was allowed")
	}
}

// A region that crosses the grant's end is handed out below it only.
func TestSliceStopsAtTheGrantsEnd(t *testing.T) {
	grant := NewGrant(0, page/2, 0x100000+page)
	grant.Raise(1 << 20)
	m := twoRegionsGranted(t, grant)
	if _, err := m.Slice(0x100000+page-8, 8); err != nil {
		t.Errorf("below the end: %v", err)
	}
	if _, err := m.Slice(0x100000+page, 1); !errors.Is(err, ErrOutOfRange) {
		t.Errorf("at the end: %v, want ErrOutOfRange", err)
	}
	if _, err := m.Slice(0x100000+page-8, 16); !errors.Is(err, ErrOutOfRange) {
		t.Errorf("across the end: %v, want ErrOutOfRange", err)
	}
}

func TestSliceAliasesSharedMemory(t *testing.T) {
	fd := memfd(t, page, 0)
	other, err := unix.Dup(fd)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(other)
	m, err := Map([]Region{{GuestPhysAddr: 0x1000, Size: page, FD: fd}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	b, err := m.Slice(0x1010, 4)
	if err != nil {
		t.Fatal(err)
	}
	copy(b, "kiln")
	got := make([]byte, 4)
	if _, err := unix.Pread(other, got, 0x10); err != nil {
		t.Fatal(err)
	}
	if string(got) != "kiln" {
		t.Fatalf("file holds %q after writing through the slice, want kiln", got)
	}
}

func TestGuestAddrFromUser(t *testing.T) {
	m := twoRegions(t)
	tests := []struct {
		uva  uint64
		want uint64
		ok   bool
	}{
		{0x7f0000000000, 0, true},
		{0x7f0000000000 + 4*page - 1, 4*page - 1, true},
		{0x7f0000000000 + 4*page, 0, false},
		{0x7f1000000000 + 0x20, 0x100020, true},
		{0x7effffffffff, 0, false},
		{0, 0, false},
	}
	for _, tt := range tests {
		got, err := m.GuestAddrFromUser(tt.uva)
		if tt.ok != (err == nil) || got != tt.want {
			t.Errorf("GuestAddrFromUser(%#x) = %#x, %v; want %#x ok=%v", tt.uva, got, err, tt.want, tt.ok)
		}
	}
}

func TestMapClosesFDs(t *testing.T) {
	fd := memfd(t, page, 0)
	m, err := Map([]Region{{Size: page, FD: fd}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if fdOpen(fd) {
		t.Fatalf("fd %d still open after Map", fd)
	}
}

func TestMapRejectsBadTablesAndClosesFDs(t *testing.T) {
	tests := []struct {
		name    string
		regions func(a, b int) []Region
	}{
		{"empty region", func(a, b int) []Region {
			return []Region{{Size: page, FD: a}, {GuestPhysAddr: 0x10000, UserAddr: 0x10000, FD: b}}
		}},
		{"overlapping guest addresses", func(a, b int) []Region {
			return []Region{{Size: 2 * page, FD: a}, {GuestPhysAddr: page, Size: page, UserAddr: 0x10000, FD: b}}
		}},
		{"overlapping frontend addresses", func(a, b int) []Region {
			return []Region{{Size: 2 * page, FD: a}, {GuestPhysAddr: 0x10000, Size: page, UserAddr: page, FD: b}}
		}},
		{"overflowing region", func(a, b int) []Region {
			return []Region{{Size: page, FD: a}, {GuestPhysAddr: ^uint64(0) - 10, Size: page, UserAddr: 0x10000, FD: b}}
		}},
		{"region past the end of its file", func(a, b int) []Region {
			return []Region{{Size: page, FD: a}, {GuestPhysAddr: 0x10000, Size: page, UserAddr: 0x10000, FD: b,
				MmapOffset: 0x10}}
		}},
		{"huge offset", func(a, b int) []Region {
			return []Region{{Size: page, FD: a}, {GuestPhysAddr: 0x10000, Size: page, UserAddr: 0x10000, FD: b,
				MmapOffset: 1 << 62}}
		}},
		{"fd that cannot be mapped", func(a, b int) []Region {
			var p [2]int
			if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
				panic(err)
			}
			unix.Close(p[1])
			unix.Close(b)
			return []Region{{Size: page, FD: a}, {GuestPhysAddr: 0x10000, Size: page, UserAddr: 0x10000, FD: p[0]}}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a, b := memfd(t, page, 0), memfd(t, page, 0)
			m, err := Map(tt.regions(a, b), nil)
			if err == nil {
				m.Close()
				t.Fatal("Map succeeded")
			}
			if fdOpen(a) || fdOpen(b) {
				t.Fatalf("fds left open after failed Map: %v %v", fdOpen(a), fdOpen(b))
			}
		})
	}
}

func TestCloseUnmaps(t *testing.T) {
	m := twoRegions(t)
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Slice(0, 1); err == nil {
		t.Fatal("Slice works after Close")
	}
}
