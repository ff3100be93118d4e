// Command vsockwrite is the bench's raw vsock baseline: run in a guest, it connects to the host (CID 2) on a
// vsock port and writes a number of zero bytes in 64 KiB blocks, then closes. Its throughput, read by the host
// through the same vsock back end as container stdio, is what stdout's throughput is compared with.
//
//	vsockwrite <port> <bytes>
package main

import (
	"fmt"
	"os"
	"strconv"

	"github.com/mdlayher/vsock"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "vsockwrite:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	if len(args) != 2 {
		return fmt.Errorf("usage: vsockwrite <port> <bytes>")
	}
	port, err := strconv.ParseUint(args[0], 10, 32)
	if err != nil {
		return fmt.Errorf("port %q: %w", args[0], err)
	}
	n, err := strconv.ParseInt(args[1], 10, 64)
	if err != nil || n < 0 {
		return fmt.Errorf("bytes %q: want a count", args[1])
	}
	c, err := vsock.Dial(vsock.Host, uint32(port), nil)
	if err != nil {
		return fmt.Errorf("dial host port %d: %w", port, err)
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
