package qemu

import (
	"encoding/binary"
	"fmt"
	"io"
	"os"

	"golang.org/x/sys/unix"
)

// The x86 boot protocol's setup header (Documentation/arch/x86/boot.rst in Linux): where a bzImage says how
// many 512-byte sectors its real-mode setup takes, and its "HdrS" signature.
const (
	bootSetupSects = 0x1f1
	bootHeaderSig  = 0x202
	bootHeaderMin  = 0x206
	bootHdrS       = 0x53726448
	// stubBody is how much of the protected-mode kernel the stub keeps after the setup: QEMU wants some.
	stubBody = 4096
)

// kernelStub makes the kernel a clone's QEMU is given: the template's bzImage cut after its real-mode setup and
// the first stubBody bytes of the kernel proper, in a memfd. A q35 machine started with -kernel has the
// linuxboot option ROM the template's state describes, and QEMU keeps a copy of the whole kernel in its heap for
// the guest's firmware to load at boot: about 5 MB of every clone's memory, for a boot a restored guest never
// makes. The stub's header is the kernel's own, so QEMU sets up the same machine. It returns nil (and the clone is
// given the kernel itself) for a kernel that is not a bzImage or that the stub would not shorten.
func kernelStub(kernel string) (*os.File, error) {
	f, err := os.Open(kernel)
	if err != nil {
		return nil, fmt.Errorf("kernel stub: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("kernel stub: %w", err)
	}
	hdr := make([]byte, bootHeaderMin)
	if _, err := io.ReadFull(f, hdr); err != nil {
		return nil, nil // too short for a bzImage
	}
	if binary.LittleEndian.Uint32(hdr[bootHeaderSig:]) != bootHdrS {
		return nil, nil
	}
	sects := int64(hdr[bootSetupSects])
	if sects == 0 {
		sects = 4 // the boot protocol's meaning of 0
	}
	size := (sects+1)*512 + stubBody
	if size >= st.Size() {
		return nil, nil
	}
	fd, err := unix.MemfdCreate("kiln-kernel-stub", unix.MFD_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("kernel stub: memfd: %w", err)
	}
	stub := os.NewFile(uintptr(fd), "kiln-kernel-stub")
	if _, err := io.Copy(stub, io.NewSectionReader(f, 0, size)); err != nil {
		stub.Close()
		return nil, fmt.Errorf("kernel stub: copy %s: %w", kernel, err)
	}
	return stub, nil
}
