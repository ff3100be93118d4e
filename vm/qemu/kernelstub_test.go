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
			stub, err := kernelStub(path)
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
	if _, err := kernelStub(filepath.Join(t.TempDir(), "missing")); err == nil {
		t.Error("no error for a missing kernel")
	}
}
