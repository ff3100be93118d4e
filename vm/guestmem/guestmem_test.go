package guestmem

import (
	"errors"
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

// A grant hands out the lowest RAM it grants, counted over the regions by address, with a block more past a gap
// that spans a block boundary; what lies beyond is refused until the grant is raised.
func TestSliceHonoursGrant(t *testing.T) {
	grant := NewGrant(page, page/2)
	m := twoRegionsGranted(t, grant)
	// The gap between the regions spans blocks of half a page: region 1 counts from 4 pages less half a page.
	tests := []struct {
		name  string
		grant uint64
		gpa   uint64
		n     uint64
		ok    bool
	}{
		{"inside the grant", page, 0, page, true},
		{"past the grant", page, page, 1, false},
		{"crosses the grant", page, page - 8, 16, false},
		{"the next region, ungranted", page, 0x100000, 1, false},
		{"the lower region, whole, once raised", 4 * page, 0, 4 * page, true},
		{"the next region, a block less counted below it", 4 * page, 0x100000, page / 2, true},
		{"the next region, past the grant", 4 * page, 0x100000, page/2 + 1, false},
		{"the next region, once raised", 4*page + page + page/2, 0x100000, 2 * page, true},
		{"a lower grant does not take it back", page, 0x100000, 2 * page, true},
		{"past everything mapped", ^uint64(0), 0x100000 + 2*page, 1, false},
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

// What a grant counts below each region of the layouts QEMU gives a vhost-user back end (128 MiB blocks).
func TestGrantCountsRAMBelowEachRegion(t *testing.T) {
	const mib, block = 1 << 20, 128 << 20
	for _, tc := range []struct {
		name    string
		regions []mapping
		want    []uint64
	}{
		{
			// QEMU 7.2's microvm with 8320 MiB: the legacy hole inside block 0, then 3 GiB, then the rest above 4 GiB.
			name: "microvm",
			regions: []mapping{{gpa: 0, size: 0xf0000}, {gpa: 0x100000, size: 0xbff00000},
				{gpa: 0x100000000, size: 0x148000000}},
			want: []uint64{0, 0xf0000, 0xf0000 + 0xbff00000 - block},
		},
		{
			// q35: 2 GiB low, whose last block SeaBIOS's tables spoil for the guest, the rest above 4 GiB.
			name:    "q35, regions out of order",
			regions: []mapping{{gpa: 0x100000000, size: 6272 * mib}, {gpa: 0, size: 0xa0000}, {gpa: 0xc0000, size: 2048*mib - 0xc0000}},
			want:    []uint64{0xa0000 + 2048*mib - 0xc0000 - block, 0, 0xa0000},
		},
		{
			name:    "one region",
			regions: []mapping{{gpa: 0, size: 256 * mib}},
			want:    []uint64{0},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g := NewGrant(0, block)
			for i, r := range tc.regions {
				if got := g.below(r, tc.regions); got != tc.want[i] {
					t.Errorf("region %d at %#x: %#x below, want %#x", i, r.gpa, got, tc.want[i])
				}
			}
		})
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
