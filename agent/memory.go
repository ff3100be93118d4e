package agent

import (
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"

	"github.com/kiln-runtime/kiln/kernfs"
)

// GuestMemory grows the guest's memory through the kernel's memory hot-plug interface in sysfs: the VM has RAM
// beyond what its kernel was booted with (mem=), which the firmware's memory map still lists
// (/sys/firmware/memmap), and each block of it is added with the probe file and brought online. Nothing is ever
// removed: a container's cgroup, not the VM's size, bounds what it uses.
type GuestMemory struct {
	// Sys is where sysfs is mounted ("/sys").
	Sys string
	// Threads is raised once memory was added: the kernel sets the guest's ceiling on threads once, at boot, from
	// the RAM it booted with (about 2000 threads in 256 MiB). Nil leaves it.
	Threads interface{ Raise() error }

	mu sync.Mutex
	// ram is the firmware's RAM, read once before the first block is added: the kernel lists each block it adds
	// in the firmware's map too.
	ram []ramRange
}

// ErrNoRAM is Add's error when the VM has no more RAM to add.
var ErrNoRAM = errors.New("no more RAM")

// Bounds on what sysfs says, which the agent trusts no further than its own kernel: a block is a power of two
// from 1 MiB to 16 GiB (128 MiB on x86-64), and the firmware's map has a handful of entries.
const (
	minMemoryBlock   = 1 << 20
	maxMemoryBlock   = 16 << 30
	maxFirmwareRange = 1024
)

// Add brings the guest's memory up to at least mib MiB, counted in whole online memory blocks, and returns what
// it has then and the size of a block, both in MiB. Blocks the kernel has but keeps offline are brought online
// first, then RAM of the firmware's map that no block holds yet is added, lowest address first; only blocks
// wholly inside one RAM range are added (a range's partial block borders firmware data).
func (g *GuestMemory) Add(mib uint64) (have, block uint64, err error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	bs, err := g.blockSize()
	if err != nil {
		return 0, 0, err
	}
	blocks, err := g.blocks()
	if err != nil {
		return 0, 0, err
	}
	want := (mib<<20 + bs - 1) / bs
	online := uint64(0)
	var offline []uint64
	for _, b := range slices.Sorted(maps.Keys(blocks)) {
		if blocks[b] {
			online++
		} else {
			offline = append(offline, b)
		}
	}
	for _, b := range offline {
		if online >= want {
			break
		}
		if err := g.online(b); err != nil {
			return online * bs >> 20, bs >> 20, err
		}
		online++
	}
	if online < want {
		if g.ram == nil {
			if g.ram, err = g.firmwareRAM(); err != nil {
				return online * bs >> 20, bs >> 20, err
			}
		}
		for _, b := range absentBlocks(g.ram, bs, blocks) {
			if online >= want {
				break
			}
			added, err := g.probe(b, bs)
			if err != nil {
				return online * bs >> 20, bs >> 20, err
			}
			if !added {
				continue
			}
			if err := g.online(b); err != nil {
				return online * bs >> 20, bs >> 20, err
			}
			online++
		}
	}
	// Raised whatever this call added: an earlier one may have added memory and failed after.
	if g.Threads != nil {
		if err := g.Threads.Raise(); err != nil {
			return online * bs >> 20, bs >> 20, err
		}
	}
	if online < want {
		return online * bs >> 20, bs >> 20, fmt.Errorf("add memory: %w: the VM has RAM for %d MiB, %d MiB asked for", ErrNoRAM, online*bs>>20, mib)
	}
	return online * bs >> 20, bs >> 20, nil
}

func (g *GuestMemory) dir() string { return filepath.Join(g.Sys, "devices/system/memory") }

// blockSize is the kernel's memory block size in bytes (block_size_bytes, in hex without 0x).
func (g *GuestMemory) blockSize() (uint64, error) {
	b, err := os.ReadFile(filepath.Join(g.dir(), "block_size_bytes"))
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return 0, fmt.Errorf("add memory: %w (memory hot-plug): %w", ErrNoHotplug, err)
		}
		return 0, fmt.Errorf("add memory: %w", err)
	}
	n, err := strconv.ParseUint(strings.TrimSpace(string(b)), 16, 64)
	if err != nil || n < minMemoryBlock || n > maxMemoryBlock || n&(n-1) != 0 {
		return 0, fmt.Errorf("add memory: memory block size %q: want a power of two from 1 MiB to 16 GiB", strings.TrimSpace(string(b)))
	}
	return n, nil
}

// blocks are the kernel's memory blocks by number, and whether each is online.
func (g *GuestMemory) blocks() (map[uint64]bool, error) {
	entries, err := os.ReadDir(g.dir())
	if err != nil {
		return nil, fmt.Errorf("add memory: %w", err)
	}
	blocks := map[uint64]bool{}
	for _, e := range entries {
		s, ok := strings.CutPrefix(e.Name(), "memory")
		if !ok {
			continue
		}
		n, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			continue
		}
		state, err := os.ReadFile(filepath.Join(g.dir(), e.Name(), "state"))
		if err != nil {
			return nil, fmt.Errorf("add memory: state of memory block %d: %w", n, err)
		}
		blocks[n] = strings.TrimSpace(string(state)) == "online"
	}
	return blocks, nil
}

// ramRange is one "System RAM" entry of the firmware's memory map: first and last byte.
type ramRange struct{ start, end uint64 }

// firmwareRAM is the RAM the firmware's memory map lists (the VM's, whatever mem= left the kernel).
func (g *GuestMemory) firmwareRAM() ([]ramRange, error) {
	dir := filepath.Join(g.Sys, "firmware/memmap")
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("add memory: the guest kernel lists no firmware memory map: %w", err)
	}
	if len(entries) > maxFirmwareRange {
		return nil, fmt.Errorf("add memory: %d firmware memory map entries, more than %d", len(entries), maxFirmwareRange)
	}
	var ranges []ramRange
	for _, e := range entries {
		read := func(name string) (string, error) {
			b, err := os.ReadFile(filepath.Join(dir, e.Name(), name))
			return strings.TrimSpace(string(b)), err
		}
		typ, err := read("type")
		if err != nil {
			return nil, fmt.Errorf("add memory: firmware memory map entry %s: %w", e.Name(), err)
		}
		if typ != "System RAM" {
			continue
		}
		var r ramRange
		for _, f := range []struct {
			name string
			v    *uint64
		}{{"start", &r.start}, {"end", &r.end}} {
			s, err := read(f.name)
			if err != nil {
				return nil, fmt.Errorf("add memory: firmware memory map entry %s: %w", e.Name(), err)
			}
			if *f.v, err = strconv.ParseUint(strings.TrimPrefix(s, "0x"), 16, 64); err != nil {
				return nil, fmt.Errorf("add memory: firmware memory map entry %s: %s %q: %w", e.Name(), f.name, s, err)
			}
		}
		if r.end < r.start {
			return nil, fmt.Errorf("add memory: firmware memory map entry %s ends at %#x before it starts at %#x", e.Name(), r.end, r.start)
		}
		ranges = append(ranges, r)
	}
	return ranges, nil
}

// absentBlocks are the numbers of the blocks of bs bytes that lie wholly inside one of ranges and that the kernel
// does not have (blocks), lowest first.
func absentBlocks(ranges []ramRange, bs uint64, blocks map[uint64]bool) []uint64 {
	var out []uint64
	for _, r := range ranges {
		first := (r.start + bs - 1) / bs
		if r.end == ^uint64(0) {
			r.end--
		}
		last := (r.end + 1) / bs // one past the last whole block
		for b := first; b < last; b++ {
			if _, ok := blocks[b]; !ok {
				out = append(out, b)
			}
		}
	}
	slices.Sort(out)
	return slices.Compact(out)
}

// probe has the kernel add memory block n, of bs bytes, and says whether it has the block then. The kernel
// refuses a block whose range another resource holds (EEXIST, and no block of that number): it is skipped.
func (g *GuestMemory) probe(n, bs uint64) (bool, error) {
	err := kernfs.Write(filepath.Join(g.dir(), "probe"), fmt.Sprintf("%#x", n*bs))
	if errors.Is(err, fs.ErrExist) {
		_, serr := os.Stat(filepath.Join(g.dir(), fmt.Sprintf("memory%d", n)))
		return serr == nil, nil
	}
	if errors.Is(err, fs.ErrNotExist) {
		return false, fmt.Errorf("add memory: add the block at %#x: %w (the memory probe interface): %w", n*bs, ErrNoHotplug, err)
	}
	if err != nil {
		return false, fmt.Errorf("add memory: add the block at %#x: %w", n*bs, err)
	}
	return true, nil
}

// online brings memory block n online, unless the kernel did so as it added it (auto_online_blocks).
func (g *GuestMemory) online(n uint64) error {
	state := filepath.Join(g.dir(), fmt.Sprintf("memory%d", n), "state")
	if b, err := os.ReadFile(state); err == nil && strings.TrimSpace(string(b)) == "online" {
		return nil
	}
	if err := kernfs.Write(state, "online"); err != nil {
		return fmt.Errorf("add memory: bring memory block %d online: %w", n, err)
	}
	return nil
}
