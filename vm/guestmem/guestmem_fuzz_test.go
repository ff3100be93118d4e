package guestmem

import (
	"encoding/binary"
	"errors"
	"testing"

	"golang.org/x/sys/unix"
)

// Fuzzed region layouts: each region takes fuzzRegionLen bytes of the layout input.
//
//	b0     flags: fuzzSealed, fuzzHuge*, fuzzBadFD, fuzzShort
//	b1-2   guest address in units of 0x80 (regions may abut, overlap or leave gaps)
//	b3-4   size in bytes (0 allowed)
//	b5-6   frontend address in units of 0x80 above 0x7f0000000000
//	b7-8   mmap offset in bytes (page aligned or not)
//	b9     how many bytes the file holds beyond (or, with fuzzShort, below) offset + size
const (
	fuzzRegionLen  = 10
	fuzzMaxRegions = 3

	fuzzSealed    = 1 << 0
	fuzzHugeGPA   = 1 << 1 // the guest address counts down from 2^64
	fuzzHugeUVA   = 1 << 2
	fuzzHugeOff   = 1 << 3
	fuzzHugeSize  = 1 << 4 // the size counts down from 2^64
	fuzzBadFD     = 1 << 5
	fuzzShort     = 1 << 6
	fuzzUserBase  = 0x7f0000000000
	fuzzQueryLen  = 7
	fuzzMaxQuery  = 64
	queryGPA      = 0 // Slice of a range near a region's start
	queryUVA      = 1 // GuestAddrFromUser near a region's frontend address
	queryWrite    = 2 // Slice, then write through it and read the byte back from the file
	queryKinds    = 3
	fuzzHugeQuery = 0x80 // in a query's kind byte: the length counts down from 2^64
)

// fuzzRegion is one region as the fuzzer laid it out, with the test's own view of its file.
type fuzzRegion struct {
	Region
	sealed   bool
	fileSize uint64
	keep     int // a duplicate of the region's file the test reads it through (-1 when no file)
	ino      uint64
}

func decodeFuzzRegions(t *testing.T, layout []byte) []fuzzRegion {
	var rs []fuzzRegion
	for i := 0; len(layout) >= fuzzRegionLen && i < fuzzMaxRegions; i, layout = i+1, layout[fuzzRegionLen:] {
		b := layout[:fuzzRegionLen]
		u16 := func(off int) uint64 { return uint64(binary.LittleEndian.Uint16(b[off:])) }
		r := fuzzRegion{keep: -1, sealed: b[0]&fuzzSealed != 0}
		r.GuestPhysAddr = u16(1) * 0x80
		r.Size = u16(3)
		r.UserAddr = fuzzUserBase + u16(5)*0x80
		r.MmapOffset = u16(7)
		if b[0]&fuzzHugeGPA != 0 {
			r.GuestPhysAddr = ^uint64(0) - u16(1)
		}
		if b[0]&fuzzHugeUVA != 0 {
			r.UserAddr = ^uint64(0) - u16(5)
		}
		if b[0]&fuzzHugeOff != 0 {
			r.MmapOffset = ^uint64(0) - u16(7)
		}
		if b[0]&fuzzHugeSize != 0 {
			r.Size = ^uint64(0) - u16(3)
		}
		// The file: large enough for offset + size unless short; never more than a few pages, so a huge size or
		// offset is always refused for reaching past it.
		want := r.MmapOffset + r.Size
		if want < r.MmapOffset || want > 1<<17 {
			want = 1 << 12
		}
		if b[0]&fuzzShort != 0 {
			r.fileSize = want - min(want, uint64(b[9])+1)
		} else {
			r.fileSize = want + uint64(b[9])
		}
		if b[0]&fuzzBadFD != 0 {
			r.FD = -1
		} else {
			r.FD, r.keep, r.ino = fuzzMemfd(t, i, r.fileSize, r.sealed)
		}
		rs = append(rs, r)
	}
	return rs
}

// fuzzMemfd makes region i's file: byte k holds fileByte(i, k). It returns the fd for Map and a duplicate the
// test keeps, closed at cleanup.
func fuzzMemfd(t *testing.T, i int, size uint64, sealed bool) (fd, keep int, ino uint64) {
	fd, err := unix.MemfdCreate("guestmem-fuzz", unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		t.Fatalf("memfd_create: %v", err)
	}
	buf := make([]byte, size)
	for k := range buf {
		buf[k] = fileByte(i, uint64(k))
	}
	if _, err := unix.Pwrite(fd, buf, 0); err != nil {
		t.Fatalf("fill memfd: %v", err)
	}
	if sealed {
		if _, err := unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS, qemuSeals); err != nil {
			t.Fatalf("seal memfd: %v", err)
		}
	}
	if keep, err = unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0); err != nil {
		t.Fatalf("dup memfd: %v", err)
	}
	t.Cleanup(func() { unix.Close(keep) })
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		t.Fatalf("stat memfd: %v", err)
	}
	return fd, keep, st.Ino
}

func fileByte(region int, k uint64) byte { return byte(k*7) + byte(region*31) + 1 }

// mappable says whether Map must accept the regions: each is non-empty, has a sealed file that holds it, does not
// overflow and overlaps no earlier region in either address space.
func mappable(rs []fuzzRegion) bool {
	for i, r := range rs {
		if r.Size == 0 || r.FD < 0 || r.Size > uint64(maxInt) ||
			r.GuestPhysAddr+r.Size < r.GuestPhysAddr || r.UserAddr+r.Size < r.UserAddr ||
			r.MmapOffset+r.Size < r.MmapOffset || r.MmapOffset+r.Size > r.fileSize ||
			!r.sealed {
			return false
		}
		for _, e := range rs[:i] {
			if r.GuestPhysAddr < e.GuestPhysAddr+e.Size && e.GuestPhysAddr < r.GuestPhysAddr+r.Size ||
				r.UserAddr < e.UserAddr+e.Size && e.UserAddr < r.UserAddr+r.Size {
				return false
			}
		}
	}
	return true
}

// FuzzMap maps fuzzed region layouts from real memfds and checks Map against a model of what it must accept,
// then fuzzed lookups against a model of address translation: an accepted range lies inside one region and, with
// a grant, inside the RAM granted, and shows that region's file at the right offset (reads and writes), anything
// else is ErrOutOfRange, and Map closes every region's file whatever happens.
func FuzzMap(f *testing.F) {
	region := func(flags byte, gpa, size, uva, off uint16, slack byte) []byte {
		b := []byte{flags, 0, 0, 0, 0, 0, 0, 0, 0, slack}
		binary.LittleEndian.PutUint16(b[1:], gpa)
		binary.LittleEndian.PutUint16(b[3:], size)
		binary.LittleEndian.PutUint16(b[5:], uva)
		binary.LittleEndian.PutUint16(b[7:], off)
		return b
	}
	query := func(kind, r byte, off int16, n uint16) []byte {
		b := []byte{kind, r, 0, 0, 0, 0, 0}
		binary.LittleEndian.PutUint16(b[2:], uint16(off))
		binary.LittleEndian.PutUint16(b[4:], n)
		return b
	}
	cat := func(parts ...[]byte) []byte {
		var b []byte
		for _, p := range parts {
			b = append(b, p...)
		}
		return b
	}
	everyQuery := cat(query(queryGPA, 0, 0, 16), query(queryGPA, 0, -1, 1), query(queryGPA, 1, 100, 4096),
		query(queryUVA, 0, 5, 0), query(queryUVA, 1, -3, 0), query(queryWrite, 1, 9, 3),
		query(queryGPA|fuzzHugeQuery, 0, 8, 0), query(queryWrite, 0, 0x7ff, 2))
	seeds := [][]byte{
		// Two sealed regions with a gap, the second at an unaligned file offset (as twoRegions).
		cat(region(fuzzSealed, 0, 0x4000, 0, 0, 0), region(fuzzSealed, 0x200, 0x2000, 0x200, 0x1010, 3)),
		// Regions that abut in both address spaces.
		cat(region(fuzzSealed, 0, 0x1000, 0, 0, 0), region(fuzzSealed, 0x20, 0x1000, 0x20, 0, 0)),
		// Overlapping guest addresses; overlapping frontend addresses.
		cat(region(fuzzSealed, 0, 0x1000, 0, 0, 0), region(fuzzSealed, 0x10, 0x1000, 0x100, 0, 0)),
		cat(region(fuzzSealed, 0, 0x1000, 0, 0, 0), region(fuzzSealed, 0x100, 0x1000, 0x10, 0, 0)),
		// A file one byte short; an unsealed file.
		region(fuzzSealed|fuzzShort, 0, 0x1000, 0, 0x10, 0),
		region(0, 0, 0x1000, 0, 0, 0),
		cat(region(0, 0, 0x1001, 0, 0, 0), region(fuzzSealed, 0x40, 1, 0x40, 0xfff, 0)),
		// Sizes and addresses that overflow, an empty region, no file.
		region(fuzzSealed|fuzzHugeGPA, 0x10, 0x1000, 0, 0, 0),
		region(fuzzSealed|fuzzHugeUVA, 0, 0x1000, 0x10, 0, 0),
		region(fuzzSealed|fuzzHugeOff, 0, 0x1000, 0, 0x10, 0),
		region(fuzzSealed|fuzzHugeSize, 0, 0, 0, 0, 0),
		cat(region(fuzzSealed, 0, 0x1000, 0, 0, 0), region(fuzzSealed, 0x100, 0, 0x100, 0, 0)),
		cat(region(fuzzSealed, 0, 0x1000, 0, 0, 0), region(fuzzBadFD, 0x100, 0x1000, 0x100, 0, 0)),
	}
	for i, s := range seeds {
		f.Add(s, everyQuery, uint32(0))
		// A boot memory of 0x40*16 bytes, 0x20*16 more granted, in blocks of 1<<(4+i%8).
		f.Add(s, everyQuery, uint32(i%8)<<16|0x20<<8|0x40)
	}
	f.Fuzz(func(t *testing.T, layout, queries []byte, grantBits uint32) {
		rs := decodeFuzzRegions(t, layout)
		regions := make([]Region, len(rs))
		for i, r := range rs {
			regions[i] = r.Region
		}
		// The low byte is the boot memory in 16-byte units (0, and no more granted: no grant), the next what is
		// granted besides, the next 4 bits a block of 1<<(4+n) bytes.
		var grant *Grant
		var model *grantModel
		if boot, more := uint64(grantBits&0xff)*16, uint64(grantBits>>8&0xff)*16; boot+more > 0 {
			shift := uint(4 + grantBits>>16&0xf)
			grant = NewGrant(boot, 1<<shift, fuzzGrantEnd)
			grant.Raise(boot + more)
			model = newGrantModel(boot, boot+more, shift)
		}
		m, err := Map(regions, grant)
		for i, r := range rs {
			if r.FD < 0 {
				continue
			}
			var st unix.Stat_t
			if unix.Fstat(r.FD, &st) == nil && st.Ino == r.ino {
				t.Fatalf("Map left region %d's file descriptor %d open", i, r.FD)
			}
		}
		want := mappable(rs) // no regions at all: an empty memory where every lookup fails
		if err != nil {
			if want {
				t.Fatalf("Map refused a valid layout %+v: %v", rs, err)
			}
			return
		}
		defer func() {
			if err := m.Close(); err != nil {
				t.Errorf("Close: %v", err)
			}
		}()
		if !want {
			t.Fatalf("Map accepted an invalid layout %+v", rs)
		}
		for q := 0; len(queries) >= fuzzQueryLen && q < fuzzMaxQuery; q, queries = q+1, queries[fuzzQueryLen:] {
			checkFuzzQuery(t, m, rs, model, queries[:fuzzQueryLen])
		}
	})
}

// fuzzGrantEnd bounds the guest addresses of the fuzzed grants' RAM: about half the fuzzed regions' addresses lie
// below it, and some regions cross it.
const fuzzGrantEnd = 1<<22 + 0x1230

// grantModel is what a Grant must allow: the boot memory's blocks, and any others the guest reaches first, as
// long as they number no more than granted, below fuzzGrantEnd.
type grantModel struct {
	shift   uint
	granted uint64 // blocks
	reached map[uint64]bool
}

func newGrantModel(boot, granted uint64, shift uint) *grantModel {
	g := &grantModel{shift: shift, reached: map[uint64]bool{}}
	ceil := func(b uint64) uint64 { return (b + 1<<shift - 1) >> shift }
	for b := range ceil(boot) {
		g.reached[b] = true
	}
	g.granted = ceil(granted)
	return g
}

// reach says whether [a, a+n), n > 0, may be reached, and records its blocks when it may.
func (g *grantModel) reach(a, n uint64) bool {
	var blocks []uint64
	for b := a >> g.shift; b <= (a+n-1)>>g.shift; b++ {
		if b<<g.shift >= fuzzGrantEnd { // a block that starts at or past the end
			return false
		}
		if !g.reached[b] {
			blocks = append(blocks, b)
		}
	}
	if uint64(len(g.reached)+len(blocks)) > g.granted {
		return false
	}
	for _, b := range blocks {
		g.reached[b] = true
	}
	return true
}

// checkFuzzQuery runs one lookup and checks it against the regions and the grant's model (nil: no grant).
func checkFuzzQuery(t *testing.T, m *Memory, rs []fuzzRegion, grant *grantModel, b []byte) {
	t.Helper()
	var base fuzzRegion
	if len(rs) > 0 {
		base = rs[int(b[1])%len(rs)]
	}
	off := int64(int16(binary.LittleEndian.Uint16(b[2:])))
	n := uint64(binary.LittleEndian.Uint16(b[4:]))
	if b[0]&fuzzHugeQuery != 0 {
		n = ^uint64(0) - n
	}
	switch int(b[0]&^fuzzHugeQuery) % queryKinds {
	case queryGPA, queryWrite:
		gpa := base.GuestPhysAddr + uint64(off)
		got, err := m.Slice(gpa, n)
		i, inside := findRange(rs, gpa, n, func(r fuzzRegion) uint64 { return r.GuestPhysAddr })
		if inside && grant != nil && n > 0 {
			inside = grant.reach(gpa, n)
		}
		if !inside {
			if err == nil || !errors.Is(err, ErrOutOfRange) {
				t.Fatalf("Slice(%#x, %#x) = %d bytes, %v; want ErrOutOfRange", gpa, n, len(got), err)
			}
			return
		}
		if err != nil {
			t.Fatalf("Slice(%#x, %#x) inside region %d: %v", gpa, n, i, err)
		}
		if uint64(len(got)) != n || uint64(cap(got)) != n {
			t.Fatalf("Slice(%#x, %#x): len %d cap %d", gpa, n, len(got), cap(got))
		}
		if n == 0 {
			return
		}
		r := rs[i]
		fileOff := r.MmapOffset + (gpa - r.GuestPhysAddr)
		for _, k := range []uint64{0, n - 1} {
			if want := readFileByte(t, r.keep, fileOff+k); got[k] != want {
				t.Fatalf("Slice(%#x, %#x)[%d] = %#x, region %d's file holds %#x at %#x", gpa, n, k, got[k], i, want,
					fileOff+k)
			}
		}
		if int(b[0]&^fuzzHugeQuery)%queryKinds == queryWrite {
			got[n-1] ^= 0xa5
			if v := readFileByte(t, r.keep, fileOff+n-1); v != got[n-1] {
				t.Fatalf("wrote %#x at gpa %#x, region %d's file holds %#x at %#x", got[n-1], gpa+n-1, i, v,
					fileOff+n-1)
			}
		}
	case queryUVA:
		uva := base.UserAddr + uint64(off)
		got, err := m.GuestAddrFromUser(uva)
		i, inside := findRange(rs, uva, 1, func(r fuzzRegion) uint64 { return r.UserAddr })
		if !inside {
			if err == nil || !errors.Is(err, ErrOutOfRange) {
				t.Fatalf("GuestAddrFromUser(%#x) = %#x, %v; want ErrOutOfRange", uva, got, err)
			}
			return
		}
		if want := rs[i].GuestPhysAddr + (uva - rs[i].UserAddr); err != nil || got != want {
			t.Fatalf("GuestAddrFromUser(%#x) = %#x, %v; want %#x (region %d)", uva, got, err, want, i)
		}
	}
}

// findRange returns the region whose range (start given by addr) holds [a, a+n), with a itself inside it.
func findRange(rs []fuzzRegion, a, n uint64, addr func(fuzzRegion) uint64) (int, bool) {
	for i, r := range rs {
		start := addr(r)
		if a >= start && a-start < r.Size && n <= r.Size-(a-start) {
			return i, true
		}
	}
	return 0, false
}

func readFileByte(t *testing.T, fd int, off uint64) byte {
	t.Helper()
	var b [1]byte
	if n, err := unix.Pread(fd, b[:], int64(off)); n != 1 || err != nil {
		t.Fatalf("read file offset %#x: %d bytes, %v", off, n, err)
	}
	return b[0]
}
