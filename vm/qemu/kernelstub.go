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
	// bootVersion is the boot protocol version; from 2.03 on, bootInitrdAddrMax is the highest address the
	// initrd may occupy, which QEMU honours when it places it (at the top of the RAM below 4 GiB, under that).
	bootVersion       = 0x206
	bootInitrdAddrMax = 0x22c
	// bootXLoadFlags (protocol 2.12 on): a kernel that says it can be loaded above 4 GiB
	// (xlfAbove4G) has QEMU ignore initrd_addr_max; the copy takes the flag out.
	bootXLoadFlags = 0x236
	xlfAbove4G     = 1 << 1
)

// kernelStub makes the kernel a clone's QEMU is given: the template's bzImage cut after its real-mode setup and
// the first stubBody bytes of the kernel proper, in a memfd. A q35 machine started with -kernel has the
// linuxboot option ROM the template's state describes, and QEMU keeps a copy of the whole kernel in its heap for
// the guest's firmware to load at boot: about 5 MB of every clone's memory, for a boot a restored guest never
// makes. The stub's header is the kernel's own (but for initrdMax, as bootKernel sets it), so QEMU sets up the
// same machine. It returns nil (and the clone is given the kernel itself) for a kernel that is not a bzImage or
// that the stub would not shorten.
func kernelStub(kernel string, initrdMax uint32) (*os.File, error) {
	return kernelCopy(kernel, true, initrdMax)
}

// bootKernel makes the kernel a guest that may grow boots (Config.MaxMemoryMiB), in a memfd: the bzImage with the
// highest address its initrd may occupy lowered to initrdMax, the top of the memory the guest's kernel boots
// with. QEMU puts the initrd at the top of the RAM below 4 GiB, past mem=, where the kernel copies it into its
// own memory and leaves the original: about 9 MB that every clone of a template would copy, and a cold VM would
// hold for its life, beyond what its cgroup grants. Below initrdMax the kernel frees the initrd where it lies,
// and a template's agent zeroes it with the rest. nil for a kernel that is no bzImage of protocol 2.03 or later.
func bootKernel(kernel string, initrdMax uint32) (*os.File, error) {
	return kernelCopy(kernel, false, initrdMax)
}

// kernelCopy copies kernel into a memfd, cut to a stub or whole, with its initrd_addr_max lowered to initrdMax
// when that is below it (0: left as it is). nil when kernel is not a bzImage, or the copy would change nothing.
func kernelCopy(kernel string, stub bool, initrdMax uint32) (*os.File, error) {
	f, err := os.Open(kernel)
	if err != nil {
		return nil, fmt.Errorf("kernel copy: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("kernel copy: %w", err)
	}
	hdr := make([]byte, bootXLoadFlags+2)
	n, _ := io.ReadFull(f, hdr)
	if n < bootHeaderMin || binary.LittleEndian.Uint32(hdr[bootHeaderSig:]) != bootHdrS {
		return nil, nil // no bzImage
	}
	version := binary.LittleEndian.Uint16(hdr[bootVersion:])
	above4G := version >= 0x20c && n == len(hdr) && binary.LittleEndian.Uint16(hdr[bootXLoadFlags:])&xlfAbove4G != 0
	patch := initrdMax > 0 && n >= bootInitrdAddrMax+4 && version >= 0x203 &&
		(binary.LittleEndian.Uint32(hdr[bootInitrdAddrMax:]) > initrdMax || above4G)
	size := st.Size()
	if stub {
		sects := int64(hdr[bootSetupSects])
		if sects == 0 {
			sects = 4 // the boot protocol's meaning of 0
		}
		if cut := (sects+1)*512 + stubBody; cut < size {
			size = cut
		} else if !patch {
			return nil, nil
		}
	} else if !patch {
		return nil, nil
	}
	fd, err := unix.MemfdCreate("kiln-kernel", unix.MFD_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("kernel copy: memfd: %w", err)
	}
	out := os.NewFile(uintptr(fd), "kiln-kernel")
	if _, err := io.Copy(out, io.NewSectionReader(f, 0, size)); err != nil {
		out.Close()
		return nil, fmt.Errorf("kernel copy: copy %s: %w", kernel, err)
	}
	if patch {
		var v [4]byte
		binary.LittleEndian.PutUint32(v[:], min(initrdMax, binary.LittleEndian.Uint32(hdr[bootInitrdAddrMax:])))
		_, err := out.WriteAt(v[:], bootInitrdAddrMax)
		if err == nil && above4G {
			var flags [2]byte
			binary.LittleEndian.PutUint16(flags[:], binary.LittleEndian.Uint16(hdr[bootXLoadFlags:])&^xlfAbove4G)
			_, err = out.WriteAt(flags[:], bootXLoadFlags)
		}
		if err != nil {
			out.Close()
			return nil, fmt.Errorf("kernel copy: %w", err)
		}
	}
	return out, nil
}
