package qemu

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"testing"
)

// bzImage is a stand-in kernel of size bytes with a boot protocol header naming sects setup sectors.
func bzImage(size int, sects byte) []byte {
	b := make([]byte, size)
	for i := range b {
		b[i] = byte(i * 7)
	}
	b[bootSetupSects] = sects
	binary.LittleEndian.PutUint32(b[bootHeaderSig:], bootHdrS)
	return b
}

// A clone's kernel stub is the kernel's setup and stubBody bytes more; a file that is no bzImage, or one the stub
// would not shorten, gets none.
func TestKernelStub(t *testing.T) {
	notBz := bzImage(64<<10, 3)
	copy(notBz[bootHeaderSig:], "ELF!")
	tests := []struct {
		name   string
		kernel []byte
		want   int // bytes of the stub, 0 for none
	}{
		{"bzImage", bzImage(64<<10, 3), 4*512 + stubBody},
		{"setup_sects 0 means 4", bzImage(64<<10, 0), 5*512 + stubBody},
		{"no HdrS", notBz, 0},
		{"too short for a header", []byte("tiny"), 0},
		{"no longer than the stub", bzImage(4*512+stubBody, 3), 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "vmlinuz")
			if err := os.WriteFile(path, tt.kernel, 0o644); err != nil {
				t.Fatal(err)
			}
			stub, err := kernelStub(path, 0)
			if err != nil {
				t.Fatal(err)
			}
			if tt.want == 0 {
				if stub != nil {
					stub.Close()
					t.Fatal("a stub for a kernel that gets none")
				}
				return
			}
			if stub == nil {
				t.Fatal("no stub")
			}
			defer stub.Close()
			// QEMU reopens it through /proc and reads it from the start.
			got, err := os.ReadFile(fmt.Sprintf("/proc/self/fd/%d", stub.Fd()))
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, tt.kernel[:tt.want]) {
				t.Errorf("stub of %d bytes, want the kernel's first %d", len(got), tt.want)
			}
		})
	}
	if _, err := kernelStub(filepath.Join(t.TempDir(), "missing"), 0); err == nil {
		t.Error("no error for a missing kernel")
	}
}

// A guest that may grow boots a copy of its kernel whose initrd_addr_max is no higher than its boot memory, so
// that QEMU puts the initrd where the kernel frees it; the clone's stub says the same.
func TestBootKernelInitrdMax(t *testing.T) {
	kernel := func(version uint16, initrdMax uint32) []byte {
		b := bzImage(64<<10, 3)
		binary.LittleEndian.PutUint16(b[bootVersion:], version)
		binary.LittleEndian.PutUint32(b[bootInitrdAddrMax:], initrdMax)
		binary.LittleEndian.PutUint16(b[bootXLoadFlags:], 0)
		return b
	}
	above4G := func(b []byte) []byte { b[bootXLoadFlags] |= xlfAbove4G; return b }
	const boot = 256<<20 - 1
	tests := []struct {
		name   string
		kernel []byte
		stub   bool
		want   uint32 // initrd_addr_max of the copy, 0 for no copy
	}{
		{"lowered", kernel(0x20f, 0x7fffffff), false, boot},
		{"lowered in the stub", kernel(0x20f, 0x7fffffff), true, boot},
		{"already below", kernel(0x20f, 1<<20), false, 0},
		{"already below, stub still cut", kernel(0x20f, 1<<20), true, 1 << 20},
		{"protocol before 2.03", kernel(0x202, 0x7fffffff), false, 0},
		{"loadable above 4 GiB: the flag taken out", above4G(kernel(0x20f, 1<<20)), false, 1 << 20},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "vmlinuz")
			if err := os.WriteFile(path, tt.kernel, 0o644); err != nil {
				t.Fatal(err)
			}
			f, err := kernelCopy(path, tt.stub, boot)
			if err != nil {
				t.Fatal(err)
			}
			if tt.want == 0 {
				if f != nil {
					f.Close()
					t.Fatal("a copy that changes nothing")
				}
				return
			}
			if f == nil {
				t.Fatal("no copy")
			}
			defer f.Close()
			got, err := os.ReadFile(fmt.Sprintf("/proc/self/fd/%d", f.Fd()))
			if err != nil {
				t.Fatal(err)
			}
			if v := binary.LittleEndian.Uint32(got[bootInitrdAddrMax:]); v != tt.want {
				t.Errorf("initrd_addr_max %#x, want %#x", v, tt.want)
			}
			want := append([]byte(nil), tt.kernel...)
			binary.LittleEndian.PutUint32(want[bootInitrdAddrMax:], tt.want)
			want[bootXLoadFlags] &^= xlfAbove4G
			if tt.stub {
				want = want[:4*512+stubBody]
			}
			if !bytes.Equal(got, want) {
				t.Errorf("copy of %d bytes differs from the kernel beyond initrd_addr_max", len(got))
			}
		})
	}
}
