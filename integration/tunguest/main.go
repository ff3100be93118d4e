// Command tunguest runs in a guest container, built by the integration tests for 32-bit x86 (GOARCH=386): it
// says how many bits its ints have, calls the system calls with 32-bit times that i386 C libraries use (futex,
// nanosleep: Go itself uses their 64-bit forms), then opens /dev/net/tun and makes a TUN interface, as a VPN
// client does, and names it. Debian's busybox has no tunctl.
package main

import (
	"fmt"
	"os"
	"strconv"
	"unsafe"

	"golang.org/x/sys/unix"
)

func main() {
	fmt.Println("bits", strconv.IntSize)
	const futexWake = 1 // FUTEX_WAKE, which x/sys/unix does not name
	var word uint32
	if _, _, errno := unix.Syscall6(unix.SYS_FUTEX, uintptr(unsafe.Pointer(&word)), futexWake, 1, 0, 0, 0); errno != 0 {
		fmt.Fprintln(os.Stderr, "futex:", errno)
		os.Exit(1)
	}
	ts := unix.Timespec{Nsec: 1000}
	// Go's runtime signals its threads (preemption): a sleep it interrupts is done again.
	errno := unix.EINTR
	for errno == unix.EINTR {
		_, _, errno = unix.Syscall(unix.SYS_NANOSLEEP, uintptr(unsafe.Pointer(&ts)), 0, 0)
	}
	if errno != 0 {
		fmt.Fprintln(os.Stderr, "nanosleep:", errno)
		os.Exit(1)
	}
	fmt.Println("time32 ok")
	f, err := os.OpenFile("/dev/net/tun", os.O_RDWR, 0)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	defer f.Close()
	ifr, err := unix.NewIfreq("kilntun0")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	ifr.SetUint16(unix.IFF_TUN | unix.IFF_NO_PI)
	if err := unix.IoctlIfreq(int(f.Fd()), unix.TUNSETIFF, ifr); err != nil {
		fmt.Fprintln(os.Stderr, "TUNSETIFF:", err)
		os.Exit(1)
	}
	fmt.Println("tun", ifr.Name())
}
