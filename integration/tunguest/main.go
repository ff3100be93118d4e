// Command tunguest runs in a guest container, built by the integration tests for 32-bit x86 (GOARCH=386): it
// says how many bits its ints have, then opens /dev/net/tun and makes a TUN interface, as a VPN client does, and
// names it. Debian's busybox has no tunctl.
package main

import (
	"fmt"
	"os"
	"strconv"

	"golang.org/x/sys/unix"
)

func main() {
	fmt.Println("bits", strconv.IntSize)
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
