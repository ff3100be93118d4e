package guestmem

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// qemuSeals are the seals QEMU's memory-backend-memfd puts on guest RAM with its default seal=on.
const qemuSeals = unix.F_SEAL_GROW | unix.F_SEAL_SHRINK | unix.F_SEAL_SEAL

// sealedMemfd returns a memfd of size bytes, created with flags, with seals added (none when zero).
func sealedMemfd(t *testing.T, size int64, flags int, seals int) int {
	t.Helper()
	fd, err := unix.MemfdCreate("guestmem-seal-test", unix.MFD_CLOEXEC|flags)
	if err != nil {
		t.Fatalf("memfd_create: %v", err)
	}
	if err := unix.Ftruncate(fd, size); err != nil {
		t.Fatalf("size memfd: %v", err)
	}
	if seals != 0 {
		if _, err := unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS, seals); err != nil {
			t.Fatalf("seal memfd: %v", err)
		}
	}
	return fd
}

// ramFile returns a 4-page regular file, as QEMU's memory-backend-file would share: it cannot carry seals.
func ramFile(t *testing.T) int {
	path := filepath.Join(t.TempDir(), "ram")
	if err := os.WriteFile(path, make([]byte, 4*page), 0o600); err != nil {
		t.Fatal(err)
	}
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	return fd
}

// TestMapRequiresMemoryThatCannotShrink pins finding 11 of issue 11: a region's file must be at least as long
// as the region when it is mapped and must be sealed against shrinking, or whoever holds the file (QEMU, which
// a guest may have taken over) could truncate it and kill the backend with SIGBUS on its next access.
func TestMapRequiresMemoryThatCannotShrink(t *testing.T) {
	tests := []struct {
		name string
		fd   func(t *testing.T) int
		size uint64
		off  uint64
		want string // error text; empty when Map must succeed
	}{
		{"memfd sealed as QEMU seals it", func(t *testing.T) int {
			return sealedMemfd(t, 4*page, unix.MFD_ALLOW_SEALING, qemuSeals)
		}, 4 * page, 0, ""},
		{"memfd sealed against shrinking only", func(t *testing.T) int {
			return sealedMemfd(t, 4*page, unix.MFD_ALLOW_SEALING, unix.F_SEAL_SHRINK)
		}, 2 * page, 2 * page, ""},
		{"memfd that allows sealing but has no seal", func(t *testing.T) int {
			return sealedMemfd(t, 4*page, unix.MFD_ALLOW_SEALING, 0)
		}, 4 * page, 0, "not sealed against shrinking"},
		{"memfd that cannot be sealed (QEMU seal=off)", func(t *testing.T) int {
			return sealedMemfd(t, 4*page, 0, 0)
		}, 4 * page, 0, "not sealed against shrinking"},
		{"memfd sealed against growing only", func(t *testing.T) int {
			return sealedMemfd(t, 4*page, unix.MFD_ALLOW_SEALING, unix.F_SEAL_GROW|unix.F_SEAL_SEAL)
		}, 4 * page, 0, "not sealed against shrinking"},
		{"sealed memfd shorter than the region", func(t *testing.T) int {
			return sealedMemfd(t, 2*page, unix.MFD_ALLOW_SEALING, qemuSeals)
		}, 4 * page, 0, "past the file's"},
		{"sealed memfd shorter than offset plus size", func(t *testing.T) int {
			return sealedMemfd(t, 4*page, unix.MFD_ALLOW_SEALING, qemuSeals)
		}, 4 * page, 0x10, "past the file's"},
		{"file that cannot be sealed", ramFile, 4 * page, 0, "not sealed against shrinking"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			fd := tt.fd(t)
			m, err := Map([]Region{{Size: tt.size, MmapOffset: tt.off, FD: fd}}, nil)
			if fdOpen(fd) {
				t.Errorf("fd %d still open after Map", fd)
			}
			if tt.want == "" {
				if err != nil {
					t.Fatalf("Map: %v", err)
				}
				defer m.Close()
				b, err := m.Slice(0, tt.size)
				if err != nil {
					t.Fatal(err)
				}
				b[len(b)-1] = 1 // the whole region is backed by the file
				return
			}
			if err == nil {
				m.Close()
				t.Fatalf("Map accepted the region; want an error mentioning %q", tt.want)
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("error %q does not mention %q", err, tt.want)
			}
		})
	}
}

// TestSealedMemoryCannotBeShrunkUnderTheMapping shows why the seal is enough: once Map accepted a region, a
// holder of the memfd cannot truncate it, so every mapped page stays backed.
func TestSealedMemoryCannotBeShrunkUnderTheMapping(t *testing.T) {
	fd := sealedMemfd(t, 4*page, unix.MFD_ALLOW_SEALING, qemuSeals)
	other, err := unix.Dup(fd) // what the frontend keeps
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(other)
	m, err := Map([]Region{{Size: 4 * page, FD: fd}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if err := unix.Ftruncate(other, page); !errors.Is(err, unix.EPERM) {
		t.Fatalf("truncating the sealed memfd under the mapping: %v, want EPERM", err)
	}
	b, err := m.Slice(0, 4*page)
	if err != nil {
		t.Fatal(err)
	}
	b[4*page-1] = 1
}
