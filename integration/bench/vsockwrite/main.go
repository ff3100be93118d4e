// Command vsockwrite is the bench's raw vsock baseline: run in a guest, it connects to the host (CID 2) on a
// vsock port and writes a number of zero bytes in 64 KiB blocks, then closes. Its throughput, read by the host
// through the same vsock back end as container stdio, is what stdout's throughput is compared with. A socket
// buffer, if given, is set on the connection first (SO_VM_SOCKETS_BUFFER_SIZE): Linux caps a socket's send
// window at it, so a baseline with the agent's stdio buffer has the same window as stdout.
//
//	vsockwrite <port> <bytes> [<socket buffer bytes>]
package main

import (
	"fmt"
	"os"
	"strconv"

	"github.com/mdlayher/vsock"
	"golang.org/x/sys/unix"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "vsockwrite:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	if len(args) != 2 && len(args) != 3 {
		return fmt.Errorf("usage: vsockwrite <port> <bytes> [<socket buffer bytes>]")
	}
	port, err := strconv.ParseUint(args[0], 10, 32)
	if err != nil {
		return fmt.Errorf("port %q: %w", args[0], err)
	}
	n, err := strconv.ParseInt(args[1], 10, 64)
	if err != nil || n < 0 {
		return fmt.Errorf("bytes %q: want a count", args[1])
	}
	var buffer uint64
	if len(args) == 3 {
		if buffer, err = strconv.ParseUint(args[2], 10, 64); err != nil {
			return fmt.Errorf("socket buffer %q: %w", args[2], err)
		}
	}
	c, err := vsock.Dial(vsock.Host, uint32(port), nil)
	if err != nil {
		return fmt.Errorf("dial host port %d: %w", port, err)
	}
	if buffer > 0 {
		if err := setBuffer(c, buffer); err != nil {
			c.Close()
			return err
		}
	}
	buf := make([]byte, 64<<10)
	for n > 0 {
		chunk := buf[:min(int64(len(buf)), n)]
		if _, err := c.Write(chunk); err != nil {
			c.Close()
			return fmt.Errorf("write: %w", err)
		}
		n -= int64(len(chunk))
	}
	return c.Close()
}

// setBuffer sets c's socket buffer, its maximum first: the kernel clamps the buffer to the maximum silently. The
// agent's listeners do the same (agent.ListenVsock); the baseline does not import the agent's package, whose
// initialisers would add to every run's start under TCG.
func setBuffer(c *vsock.Conn, buffer uint64) error {
	rc, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		if serr = unix.SetsockoptUint64(int(fd), unix.AF_VSOCK, unix.SO_VM_SOCKETS_BUFFER_MAX_SIZE, buffer); serr != nil {
			return
		}
		serr = unix.SetsockoptUint64(int(fd), unix.AF_VSOCK, unix.SO_VM_SOCKETS_BUFFER_SIZE, buffer)
	}); err != nil {
		return err
	}
	if serr != nil {
		return fmt.Errorf("set the socket buffer to %d: %w", buffer, serr)
	}
	return nil
}
