// Package guestmem owns guest RAM as seen by a vhost-user backend: it maps the regions a frontend shares
// (VHOST_USER_SET_MEM_TABLE) and hands out bounds-checked views of guest physical addresses.
//
// It must not know about virtqueues, vhost-user messages or any device: it only translates addresses.
package guestmem

import (
	"errors"
	"fmt"
	"math/bits"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// Region describes one guest RAM region as sent by VHOST_USER_SET_MEM_TABLE.
type Region struct {
	GuestPhysAddr uint64
	Size          uint64
	UserAddr      uint64 // the frontend's (QEMU's) virtual address of the region
	MmapOffset    uint64
	FD            int // Map takes ownership and closes it after mmap
}

// mapping is one region mapped into this process.
type mapping struct {
	gpa      uint64
	size     uint64
	userAddr uint64
	// whole is the full mmap'ed range (it may start before the region when MmapOffset is not page aligned);
	// data is the region itself.
	whole []byte
	data  []byte
}

// Memory is guest RAM mapped into this process. Safe for concurrent reads/writes of distinct bytes.
// Slices handed out alias the mapping and must not be used after Close.
type Memory struct {
	maps  []mapping
	grant *Grant
}

// ErrOutOfRange is wrapped by errors for addresses that are not inside one mapped region, or not inside the part
// of guest RAM granted (Grant).
var ErrOutOfRange = errors.New("address range outside guest memory")

// Grant is how much of its RAM a guest was given, for a VM whose RAM is larger than what its kernel may use: one
// booted with less (mem=) whose memory is added later, block by block. Memory hands out the blocks the guest
// booted with, and as many more as were granted besides, whichever the guest reaches first: it counts blocks, not
// where they are, so that neither the firmware's layout nor the order in which the guest adds blocks matters.
// Without it a guest could point buffers anywhere in RAM it was never given and have this process fault in, and
// be charged for, every page of it. A grant only grows. Safe for concurrent use.
type Grant struct {
	shift uint // log2 of the block size
	bytes atomic.Uint64
	// reached has a bit for each block, by guest address, that Memory has handed out (or that the guest booted
	// with); mu orders additions, which count keeps.
	reached []atomic.Uint64
	nblocks uint64 // below the RAM's end
	mu      sync.Mutex
	count   uint64
}

// NewGrant is a grant of boot bytes of RAM, the guest's from address 0 (its kernel's mem=), in a guest that adds
// memory in blocks of block bytes (a power of two) and whose RAM lies below guest address end; it keeps a bit for
// each block below end.
func NewGrant(boot, block, end uint64) *Grant {
	if block == 0 || block&(block-1) != 0 {
		panic(fmt.Sprintf("guestmem: a grant's block of %d bytes is not a power of two", block))
	}
	g := &Grant{shift: uint(bits.TrailingZeros64(block))}
	g.bytes.Store(boot)
	var blocks uint64
	if end > 0 {
		blocks = (end-1)>>g.shift + 1
	}
	g.reached, g.nblocks = make([]atomic.Uint64, (blocks+63)/64), blocks
	for b := uint64(0); b < g.blocks(boot) && b < blocks; b++ {
		g.reached[b/64].Or(1 << (b % 64))
		g.count++
	}
	return g
}

// Raise grants bytes of RAM, if that is more than before.
func (g *Grant) Raise(bytes uint64) {
	for {
		old := g.bytes.Load()
		if bytes <= old || g.bytes.CompareAndSwap(old, bytes) {
			return
		}
	}
}

// Bytes is the RAM granted.
func (g *Grant) Bytes() uint64 { return g.bytes.Load() }

// blocks is how many blocks bytes take, rounded up.
func (g *Grant) blocks(bytes uint64) uint64 { return (bytes + 1<<g.shift - 1) >> g.shift }

func (g *Grant) has(b uint64) bool { return g.reached[b/64].Load()&(1<<(b%64)) != 0 }

// allows says whether the guest may reach [gpa, gpa+n), n > 0 and gpa+n not past 2^64, counting the blocks of it
// the guest had not reached before against the grant.
func (g *Grant) allows(gpa, n uint64) bool {
	first, last := gpa>>g.shift, (gpa+n-1)>>g.shift
	if last >= g.nblocks {
		return false
	}
	reached := true
	for b := first; b <= last && reached; b++ {
		reached = g.has(b)
	}
	if reached {
		return true
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	var need uint64
	for b := first; b <= last; b++ {
		if !g.has(b) {
			need++
		}
	}
	if g.count+need > g.blocks(g.bytes.Load()) {
		return false
	}
	for b := first; b <= last; b++ {
		g.reached[b/64].Or(1 << (b % 64))
	}
	g.count += need
	return true
}

// Map maps every region (read-write, shared) and closes every region's FD, also on failure. Each region's file
// must be sealed against shrinking (F_SEAL_SHRINK, set by QEMU's memory-backend-memfd unless seal=off) and hold
// the whole region. With a grant, only the part of RAM it grants is handed out (nil: all of it).
func Map(regions []Region, grant *Grant) (*Memory, error) {
	defer func() {
		for _, r := range regions {
			if r.FD >= 0 {
				unix.Close(r.FD)
			}
		}
	}()
	m := &Memory{maps: make([]mapping, 0, len(regions)), grant: grant}
	for i, r := range regions {
		if err := checkRegion(r, regions[:i]); err != nil {
			m.Close()
			return nil, fmt.Errorf("map guest memory region %d: %w", i, err)
		}
		mp, err := mapRegion(r)
		if err != nil {
			m.Close()
			return nil, fmt.Errorf("map guest memory region %d (gpa %#x size %#x fd %d): %w",
				i, r.GuestPhysAddr, r.Size, r.FD, err)
		}
		m.maps = append(m.maps, mp)
	}
	return m, nil
}

// checkBacking makes sure every page of the region stays backed by its file for as long as it is mapped:
// touching a page past the end of the file kills this process with SIGBUS. The file must hold the whole region
// now and be sealed so that nobody (QEMU, or a guest that took QEMU over) can
// shrink it later.
func checkBacking(r Region) error {
	// Seals first: once F_SEAL_SHRINK is seen the size can only grow, so the size read after it stays a lower
	// bound. The other way round, the file could shrink between the two checks and be sealed after.
	seals, err := unix.FcntlInt(uintptr(r.FD), unix.F_GET_SEALS, 0)
	switch {
	case err == nil && seals&unix.F_SEAL_SHRINK != 0:
	case err == nil || errors.Is(err, unix.EINVAL): // EINVAL: a file that cannot carry seals at all
		return fmt.Errorf("file is not sealed against shrinking (F_SEAL_SHRINK; seals %#x): "+
			"guest RAM must be a sealed memfd (QEMU memory-backend-memfd with seal=on)", max(seals, 0))
	default:
		return fmt.Errorf("read file seals: %w", err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(r.FD, &st); err != nil {
		return fmt.Errorf("stat: %w", err)
	}
	if st.Mode&unix.S_IFMT == unix.S_IFREG && (st.Size < 0 || r.MmapOffset+r.Size > uint64(st.Size)) {
		return fmt.Errorf("offset %#x size %#x reaches past the file's %#x bytes", r.MmapOffset, r.Size, st.Size)
	}
	return nil
}

// checkRegion rejects regions that would make address translation ambiguous or overflow.
func checkRegion(r Region, earlier []Region) error {
	if r.Size == 0 {
		return errors.New("empty region")
	}
	if r.FD < 0 {
		return fmt.Errorf("invalid file descriptor %d", r.FD)
	}
	if r.GuestPhysAddr+r.Size < r.GuestPhysAddr || r.UserAddr+r.Size < r.UserAddr ||
		r.MmapOffset+r.Size < r.MmapOffset {
		return fmt.Errorf("region gpa %#x uva %#x offset %#x size %#x overflows",
			r.GuestPhysAddr, r.UserAddr, r.MmapOffset, r.Size)
	}
	if r.Size > uint64(maxInt) {
		return fmt.Errorf("region size %#x too large", r.Size)
	}
	for j, e := range earlier {
		if r.GuestPhysAddr < e.GuestPhysAddr+e.Size && e.GuestPhysAddr < r.GuestPhysAddr+r.Size {
			return fmt.Errorf("guest addresses overlap region %d", j)
		}
		if r.UserAddr < e.UserAddr+e.Size && e.UserAddr < r.UserAddr+r.Size {
			return fmt.Errorf("frontend addresses overlap region %d", j)
		}
	}
	return nil
}

const maxInt = int(^uint(0) >> 1)

func mapRegion(r Region) (mapping, error) {
	page := uint64(unix.Getpagesize())
	// mmap needs a page-aligned file offset; the frontend's offset need not be one.
	aligned := r.MmapOffset &^ (page - 1)
	lead := r.MmapOffset - aligned
	length := r.Size + lead
	if length < r.Size || length > uint64(maxInt) || aligned > uint64(maxInt) {
		return mapping{}, fmt.Errorf("mmap offset %#x size %#x too large", r.MmapOffset, r.Size)
	}
	if err := checkBacking(r); err != nil {
		return mapping{}, err
	}
	whole, err := unix.Mmap(r.FD, int64(aligned), int(length), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return mapping{}, fmt.Errorf("mmap: %w", err)
	}
	return mapping{
		gpa:      r.GuestPhysAddr,
		size:     r.Size,
		userAddr: r.UserAddr,
		whole:    whole,
		data:     whole[lead : lead+r.Size : lead+r.Size],
	}, nil
}

// Slice returns guest memory [gpa, gpa+n) as a slice aliasing the mapping; error if not inside one region.
// The slice's capacity is n, so appending to it never writes past the requested range.
func (m *Memory) Slice(gpa uint64, n uint64) ([]byte, error) {
	for i := range m.maps {
		mp := &m.maps[i]
		if gpa < mp.gpa || gpa-mp.gpa >= mp.size {
			continue
		}
		off := gpa - mp.gpa
		if n > mp.size-off {
			break
		}
		if m.grant != nil && n > 0 && !m.grant.allows(gpa, n) {
			return nil, fmt.Errorf("guest range [%#x, +%#x) reaches more RAM than the %d bytes granted: %w",
				gpa, n, m.grant.Bytes(), ErrOutOfRange)
		}
		return mp.data[off : off+n : off+n], nil
	}
	return nil, fmt.Errorf("guest range [%#x, +%#x): %w", gpa, n, ErrOutOfRange)
}

// GuestAddrFromUser translates a frontend virtual address (as used by SET_VRING_ADDR) to a guest physical address.
func (m *Memory) GuestAddrFromUser(uva uint64) (uint64, error) {
	for _, mp := range m.maps {
		if uva >= mp.userAddr && uva-mp.userAddr < mp.size {
			return mp.gpa + (uva - mp.userAddr), nil
		}
	}
	return 0, fmt.Errorf("frontend address %#x: %w", uva, ErrOutOfRange)
}

// Close munmaps all regions. Slices obtained before must no longer be used.
func (m *Memory) Close() error {
	var errs []error
	for i, mp := range m.maps {
		if err := unix.Munmap(mp.whole); err != nil {
			errs = append(errs, fmt.Errorf("unmap guest memory region %d: %w", i, err))
		}
	}
	m.maps = nil
	return errors.Join(errs...)
}
