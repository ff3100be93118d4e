package agent

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

func TestAbsentBlocks(t *testing.T) {
	const bs = 128 << 20
	for _, tc := range []struct {
		name    string
		ranges  []ramRange
		present []uint64
		want    []uint64
	}{
		{"boot blocks present", []ramRange{{0x100000, 4*bs - 1}}, []uint64{0, 1}, []uint64{2, 3}},
		// q35's low RAM ends just below 2 GiB, where the firmware keeps its tables: that block is partial.
		{"partial blocks left out", []ramRange{{0, 0x9fbff}, {0x100000, 0x7ffdffff}, {0x100000000, 0x17fffffff}}, []uint64{0, 1},
			[]uint64{2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 45, 46, 47}},
		{"unaligned start", []ramRange{{bs + 1, 3*bs - 1}}, nil, []uint64{2}},
		{"all present", []ramRange{{0, 2*bs - 1}}, []uint64{0, 1}, nil},
		{"overlapping ranges counted once", []ramRange{{0, 2*bs - 1}, {0, 2*bs - 1}}, nil, []uint64{0, 1}},
		{"the end of the address space", []ramRange{{^uint64(0) - 2*bs + 1, ^uint64(0)}}, nil, []uint64{(^uint64(0))/bs - 1}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			blocks := map[uint64]bool{}
			for _, b := range tc.present {
				blocks[b] = true
			}
			if got := absentBlocks(tc.ranges, bs, blocks); !slices.Equal(got, tc.want) {
				t.Errorf("absentBlocks = %v, want %v", got, tc.want)
			}
		})
	}
}

// fakeSys lays out a sysfs with a memory block size, blocks by number with their state, and firmware RAM ranges.
func fakeSys(t *testing.T, blockSize string, blocks map[int]string, ram [][2]uint64) string {
	t.Helper()
	sys := t.TempDir()
	mem := filepath.Join(sys, "devices/system/memory")
	write := func(path, content string) {
		t.Helper()
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write(filepath.Join(mem, "block_size_bytes"), blockSize+"\n")
	write(filepath.Join(mem, "auto_online_blocks"), "offline\n")
	write(filepath.Join(mem, "probe"), "")
	for n, state := range blocks {
		write(filepath.Join(mem, fmt.Sprintf("memory%d", n), "state"), state+"\n")
	}
	for i, r := range ram {
		d := filepath.Join(sys, "firmware/memmap", fmt.Sprint(i))
		write(filepath.Join(d, "start"), fmt.Sprintf("%#x\n", r[0]))
		write(filepath.Join(d, "end"), fmt.Sprintf("%#x\n", r[1]))
		write(filepath.Join(d, "type"), "System RAM\n")
	}
	return sys
}

func TestGuestMemoryAdd(t *testing.T) {
	const bs = 128 << 20
	t.Run("offline blocks brought online", func(t *testing.T) {
		sys := fakeSys(t, "8000000", map[int]string{0: "online", 1: "online", 2: "offline", 3: "offline"}, [][2]uint64{{0, 4*bs - 1}})
		raised := &raiseCount{}
		have, block, err := (&GuestMemory{Sys: sys, Threads: raised}).Add(300)
		if err != nil || have != 384 || block != 128 {
			t.Fatalf("Add(300) = %d, %d, %v; want 384, 128, nil", have, block, err)
		}
		// The kernel derives its ceiling on threads again from the RAM added.
		if raised.n != 1 {
			t.Errorf("threads raised %d times after memory was added, want once", raised.n)
		}
		for n, want := range map[int]string{2: "online", 3: "offline"} {
			b, _ := os.ReadFile(filepath.Join(sys, "devices/system/memory", fmt.Sprintf("memory%d", n), "state"))
			if strings.TrimSpace(string(b)) != want {
				t.Errorf("memory%d is %q, want %q", n, b, want)
			}
		}
	})
	t.Run("enough already", func(t *testing.T) {
		sys := fakeSys(t, "8000000", map[int]string{0: "online", 1: "online"}, nil)
		raised := &raiseCount{}
		have, _, err := (&GuestMemory{Sys: sys, Threads: raised}).Add(200)
		if err != nil || have != 256 {
			t.Fatalf("Add(200) = %d, %v; want 256, nil", have, err)
		}
		// Raised all the same (Raise changes nothing where the ceiling is there already): an earlier call may
		// have added the memory and failed after.
		if raised.n != 1 {
			t.Errorf("threads raised %d times, want once", raised.n)
		}
	})
	t.Run("probed at the block's address", func(t *testing.T) {
		sys := fakeSys(t, "8000000", map[int]string{0: "online", 1: "online"}, [][2]uint64{{0, 3*bs - 1}})
		// A fake kernel adds nothing: the probe is written, and the block it should have added is missing.
		_, _, err := (&GuestMemory{Sys: sys}).Add(384)
		if err == nil || !strings.Contains(err.Error(), "memory block 2 online") {
			t.Fatalf("Add(384) = %v, want an error bringing memory block 2 online", err)
		}
		if b, _ := os.ReadFile(filepath.Join(sys, "devices/system/memory/probe")); string(b) != "0x10000000" {
			t.Errorf("probe got %q, want 0x10000000", b)
		}
	})
	t.Run("no more RAM", func(t *testing.T) {
		sys := fakeSys(t, "8000000", map[int]string{0: "online", 1: "online"}, [][2]uint64{{0x100000, 2*bs - 1}})
		have, _, err := (&GuestMemory{Sys: sys}).Add(512)
		if !errors.Is(err, ErrNoRAM) || have != 256 {
			t.Fatalf("Add(512) = %d, %v; want 256 and ErrNoRAM", have, err)
		}
	})
	// A kernel built without memory hot-plug, or without its probe interface, can add nothing: the host is told
	// so (codes.Unimplemented), and only then that its configuration must not grow the VM.
	for name, missing := range map[string]string{"no memory hot-plug": "block_size_bytes", "no probe interface": "probe"} {
		t.Run(name, func(t *testing.T) {
			sys := fakeSys(t, "8000000", map[int]string{0: "online"}, [][2]uint64{{0, 2*bs - 1}})
			if err := os.Remove(filepath.Join(sys, "devices/system/memory", missing)); err != nil {
				t.Fatal(err)
			}
			if _, _, err := (&GuestMemory{Sys: sys}).Add(256); !errors.Is(err, ErrNoHotplug) {
				t.Fatalf("Add(256) without %s: %v, want ErrNoHotplug", missing, err)
			}
		})
	}
	t.Run("threads not raised", func(t *testing.T) {
		sys := fakeSys(t, "8000000", map[int]string{0: "online", 1: "offline"}, nil)
		_, _, err := (&GuestMemory{Sys: sys, Threads: failingRaise{}}).Add(256)
		if err == nil || errors.Is(err, ErrNoHotplug) {
			t.Fatalf("Add(256) with threads-max refused: %v, want that error, not ErrNoHotplug", err)
		}
	})
	for _, bad := range []string{"0", "zz", "8000001", "800000000000"} {
		t.Run("block size "+bad, func(t *testing.T) {
			sys := fakeSys(t, bad, map[int]string{0: "online"}, nil)
			if _, _, err := (&GuestMemory{Sys: sys}).Add(512); err == nil || !strings.Contains(err.Error(), "memory block size") {
				t.Fatalf("Add with block size %q: %v, want an error naming the block size", bad, err)
			}
		})
	}
}

// failingRaise is a guest whose threads' ceiling cannot be raised.
type failingRaise struct{}

func (failingRaise) Raise() error {
	return errors.New("write /proc/sys/kernel/threads-max: invalid argument")
}

// raiseCount counts GuestMemory's calls to raise the guest's threads.
type raiseCount struct{ n int }

func (r *raiseCount) Raise() error { r.n++; return nil }
