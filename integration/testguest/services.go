package main

import (
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"net"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kiln-runtime/kiln/integration/testguest/stream"
)

// Slow sink pacing: small enough pauses to keep the test short, often enough
// that the sender's credit runs out and flow control has to work.
const (
	slowChunk = 64 << 10
	slowPause = 5 * time.Millisecond
)

// halfCloser is a connection that can send EOF and keep reading (vsock, unix
// and TCP connections all can).
type halfCloser interface {
	CloseWrite() error
}

func closeWrite(c net.Conn) error {
	hc, ok := c.(halfCloser)
	if !ok {
		return fmt.Errorf("%T cannot half-close", c)
	}
	return hc.CloseWrite()
}

func echo(c net.Conn) error {
	if _, err := io.Copy(c, c); err != nil {
		return fmt.Errorf("echo: %w", err)
	}
	return closeWrite(c)
}

func sink(c net.Conn) error {
	h := sha256.New()
	n, err := io.Copy(h, c)
	if err != nil {
		return fmt.Errorf("sink after %d bytes: %w", n, err)
	}
	return writeDigest(c, h, n)
}

func slowSink(c net.Conn) error {
	h := sha256.New()
	buf := make([]byte, slowChunk)
	var total int64
	for {
		n, err := io.ReadFull(c, buf)
		h.Write(buf[:n])
		total += int64(n)
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			break
		}
		if err != nil {
			return fmt.Errorf("slow sink after %d bytes: %w", total, err)
		}
		time.Sleep(slowPause)
	}
	return writeDigest(c, h, total)
}

func writeDigest(w io.Writer, h hash.Hash, n int64) error {
	if _, err := fmt.Fprintf(w, "%s %d\n", hex.EncodeToString(h.Sum(nil)), n); err != nil {
		return fmt.Errorf("write digest: %w", err)
	}
	return nil
}

func source(c net.Conn) error {
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return fmt.Errorf("read source request: %w", err)
	}
	var (
		n    int64
		seed uint64
	)
	if _, err := fmt.Sscanf(line, "%d %d\n", &n, &seed); err != nil || n < 0 {
		return fmt.Errorf("parse source request %q: want \"<n> <seed>\\n\"", line)
	}
	if _, err := io.CopyN(c, stream.New(seed), n); err != nil {
		return fmt.Errorf("send %d bytes of stream %d: %w", n, seed, err)
	}
	return nil
}

// smallBufferSource is source from a socket whose buffer is smallBuffer.
func smallBufferSource(c net.Conn) error {
	if err := setBufferSize(c, smallBuffer); err != nil {
		return err
	}
	return source(c)
}

// smallBuffer is the small-buffer source's socket buffer.
const smallBuffer = 64 << 10

// setBufferSize sets a vsock connection's buffer (its buf_alloc), as a guest program may.
func setBufferSize(c net.Conn, size uint64) error {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return fmt.Errorf("%T has no socket to size", c)
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		serr = unix.SetsockoptUint64(int(fd), unix.AF_VSOCK, unix.SO_VM_SOCKETS_BUFFER_SIZE, size)
	}); err != nil {
		return err
	}
	if serr != nil {
		return fmt.Errorf("set vsock buffer size %d: %w", size, serr)
	}
	return nil
}

// dialBack returns the dial-back handler; dial is how it reaches the host
// (vsock CID 2 in the guest, anything in tests).
func dialBack(dial func(port uint32) (net.Conn, error)) handler {
	return func(c net.Conn) error {
		line, err := bufio.NewReader(c).ReadString('\n')
		if err != nil {
			return fmt.Errorf("read dial-back request: %w", err)
		}
		port, err := strconv.ParseUint(strings.TrimSpace(line), 10, 32)
		if err != nil {
			return fmt.Errorf("parse dial-back port %q: %w", line, err)
		}
		hc, err := dial(uint32(port))
		if err != nil {
			return err
		}
		defer hc.Close()
		if _, err := io.WriteString(hc, "hello from guest\n"); err != nil {
			return fmt.Errorf("greet host port %d: %w", port, err)
		}
		reply, err := bufio.NewReader(hc).ReadString('\n')
		if err != nil {
			return fmt.Errorf("read reply of host port %d: %w", port, err)
		}
		if _, err := io.WriteString(c, reply); err != nil {
			return fmt.Errorf("relay reply of host port %d: %w", port, err)
		}
		return nil
	}
}
