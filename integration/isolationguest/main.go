// Command isolationguest runs in a guest container, built by the integration tests: it reports what a
// container's process can reach of its guest beyond the container. For each vsock port the agent listens on it
// says whether a connection to the loopback CID (1) was refused, closed unread by the agent, or left open; then
// the container's cgroup as it sees it, whether the guest's cgroup2 hierarchy has nsdelegate, and the guest's
// limit on open files and dmesg restriction. Debian's busybox has no vsock client.
package main

import (
	"fmt"
	"os"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

func main() {
	for _, port := range []uint32{1024, 1025, 1026} {
		fmt.Printf("vsock 1:%d %s\n", port, dial(1, port))
	}
	cg, _ := os.ReadFile("/proc/self/cgroup")
	fmt.Printf("cgroup %s\n", strings.TrimSpace(string(cg)))
	fmt.Printf("nsdelegate %v\n", nsdelegate())
	for _, f := range []string{"fs/file-max", "kernel/dmesg_restrict"} {
		b, _ := os.ReadFile("/proc/sys/" + f)
		fmt.Printf("%s %s\n", f, strings.TrimSpace(string(b)))
	}
}

// dial connects to cid:port and says what came of it: "refused" (the connection failed), "closed" (the peer
// closed it without a word) or "open" (it stayed open for two seconds, or the peer wrote).
func dial(cid, port uint32) string {
	fd, err := unix.Socket(unix.AF_VSOCK, unix.SOCK_STREAM, 0)
	if err != nil {
		return "refused (" + err.Error() + ")"
	}
	defer unix.Close(fd)
	if err := unix.Connect(fd, &unix.SockaddrVM{CID: cid, Port: port}); err != nil {
		return "refused"
	}
	tv := unix.NsecToTimeval((2 * time.Second).Nanoseconds())
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		return "error " + err.Error()
	}
	var b [1]byte
	n, err := unix.Read(fd, b[:])
	if err == nil && n == 0 {
		return "closed"
	}
	if err != nil && err != unix.EAGAIN && err != unix.EWOULDBLOCK {
		return "closed"
	}
	return "open"
}

// nsdelegate says whether the cgroup2 mount at /sys/fs/cgroup shows nsdelegate among its super block's options
// (the hierarchy's flags, the same in every mount of it).
func nsdelegate() bool {
	b, _ := os.ReadFile("/proc/self/mountinfo")
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.Fields(l)
		if len(f) > 4 && f[4] == "/sys/fs/cgroup" && strings.Contains(l, " - cgroup2 ") {
			return strings.Contains(l[strings.Index(l, " - "):], "nsdelegate")
		}
	}
	return false
}
