package confine

import (
	"fmt"
	"runtime"
	"unsafe"

	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"
)

// allowedFamilies are the only socket families a confined program may make a socket of: UNIX sockets (QEMU's
// socket pairs) and netlink. Every other is refused: the internet's (TCP, UDP, and Multipath TCP, which
// Landlock's network rights do not cover), vsock (the host's AF_VSOCK listeners), packet sockets, and families
// that reach the network through a kernel socket of their own (SMC, RDS), which no LSM hook sees. QEMU, given
// every socket it uses as a descriptor, makes none of them.
var allowedFamilies = []uint32{unix.AF_UNIX, unix.AF_NETLINK}

// x32SyscallBit marks the x32 ABI's system call numbers, which the filter refuses with the rest of what is not
// plain x86-64.
const x32SyscallBit = 0x40000000

// Offsets in struct seccomp_data.
const (
	seccompNr   = 0
	seccompArch = 4
	seccompArg0 = 16 // the low 32 bits, little-endian
)

// socketFilter is a seccomp program that refuses socket(2) outside allowedFamilies with EACCES, and io_uring_setup(2)
// with ENOSYS (an io_uring makes sockets without socket(2); QEMU then watches its descriptors with ppoll), as
// well as any system call of another ABI (i386 through int 0x80, x32) with ENOSYS. It allows everything else.
func socketFilter() ([]unix.SockFilter, error) {
	errno := func(e unix.Errno) bpf.Instruction {
		return bpf.RetConstant{Val: unix.SECCOMP_RET_ERRNO | uint32(e)&unix.SECCOMP_RET_DATA}
	}
	allow := bpf.RetConstant{Val: unix.SECCOMP_RET_ALLOW}
	n := uint8(len(allowedFamilies))
	prog := []bpf.Instruction{
		bpf.LoadAbsolute{Off: seccompArch, Size: 4},
		bpf.JumpIf{Cond: bpf.JumpEqual, Val: unix.AUDIT_ARCH_X86_64, SkipFalse: 5},
		bpf.LoadAbsolute{Off: seccompNr, Size: 4},
		bpf.JumpIf{Cond: bpf.JumpGreaterOrEqual, Val: x32SyscallBit, SkipTrue: 3},
		bpf.JumpIf{Cond: bpf.JumpEqual, Val: unix.SYS_IO_URING_SETUP, SkipTrue: 2},
		bpf.JumpIf{Cond: bpf.JumpEqual, Val: unix.SYS_SOCKET, SkipTrue: 2},
		allow,
		errno(unix.ENOSYS),
		bpf.LoadAbsolute{Off: seccompArg0, Size: 4},
	}
	for i, f := range allowedFamilies {
		// Each test jumps to the allow after the EACCES return that ends the list.
		prog = append(prog, bpf.JumpIf{Cond: bpf.JumpEqual, Val: f, SkipTrue: n - uint8(i)})
	}
	prog = append(prog, errno(unix.EACCES), allow)
	raw, err := bpf.Assemble(prog)
	if err != nil {
		return nil, fmt.Errorf("assemble the socket filter: %w", err)
	}
	out := make([]unix.SockFilter, len(raw))
	for i, r := range raw {
		out[i] = unix.SockFilter{Code: r.Op, Jt: r.Jt, Jf: r.Jf, K: r.K}
	}
	return out, nil
}

// filterSockets installs socketFilter on the calling thread, which passes it on to what it forks and that
// program keeps it across exec. The kernel takes it from a thread with no_new_privs or CAP_SYS_ADMIN.
func filterSockets() error {
	filter, err := socketFilter()
	if err != nil {
		return err
	}
	prog := unix.SockFprog{Len: uint16(len(filter)), Filter: &filter[0]}
	// prctl, not seccomp(2) with SECCOMP_FILTER_FLAG_TSYNC: this thread only. Called as a system call, whose
	// pointer arguments the compiler keeps where they are for the call.
	_, _, e := unix.Syscall6(unix.SYS_PRCTL, unix.PR_SET_SECCOMP, unix.SECCOMP_MODE_FILTER, uintptr(unsafe.Pointer(&prog)), 0, 0, 0)
	runtime.KeepAlive(filter)
	if e != 0 {
		return fmt.Errorf("install the socket filter: %w", e)
	}
	return nil
}
