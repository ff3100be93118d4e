package integration

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kiln-runtime/kiln/integration/testguest/stream"
	"github.com/kiln-runtime/kiln/vm/qemu"
)

// Ports of the test guest's services (integration/testguest).
const (
	echoPort     = 5001
	sinkPort     = 5002
	sourcePort   = 5003
	dialBackPort = 5004
	slowSinkPort = 5005
	// smallBufferSourcePort is a source whose socket has a 64 KiB buffer.
	smallBufferSourcePort = 5006
)

type halfCloser interface{ CloseWrite() error }

// bootTestGuest boots the test guest (the agent plus the vsock test services) and waits for its agent.
func bootTestGuest(t *testing.T) *qemu.Machine {
	t.Helper()
	requireVM(t)
	kernel, initrd := buildInitrd(t, buildStatic(t, "./integration/testguest"))
	m := testMachine(t, kernel, initrd, func(c *qemu.Config) { c.MemoryMiB = 512 })
	startSandbox(t, m, 60*time.Second)
	return m
}

func dial(t *testing.T, m *qemu.Machine, port uint32) net.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := m.DialVsock(ctx, port)
	if err != nil {
		t.Fatalf("dial guest port %d: %v", port, err)
	}
	if _, ok := c.(halfCloser); !ok {
		t.Fatalf("vsock connection %T cannot half-close", c)
	}
	return c
}

// sendToSink writes n bytes of stream seed to a sink port and returns the sink's "<sha256> <count>" answer.
func sendToSink(c net.Conn, seed uint64, n int64) (want, got string, err error) {
	defer c.Close()
	h := sha256.New()
	if _, err := io.CopyN(io.MultiWriter(c, h), stream.New(seed), n); err != nil {
		return "", "", fmt.Errorf("write %d bytes: %w", n, err)
	}
	if err := c.(halfCloser).CloseWrite(); err != nil {
		return "", "", fmt.Errorf("half-close: %w", err)
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return "", "", fmt.Errorf("read sink digest: %w", err)
	}
	return fmt.Sprintf("%s %d", hex.EncodeToString(h.Sum(nil)), n), strings.TrimSpace(line), nil
}

// readFromSource asks the source port for n bytes of stream seed and checks them against the expected bytes.
func readFromSource(c net.Conn, seed uint64, n int64, slow bool) error {
	defer c.Close()
	if _, err := fmt.Fprintf(c, "%d %d\n", n, seed); err != nil {
		return err
	}
	var r io.Reader = c
	if slow {
		r = &slowReader{r: c, chunk: 32 << 10, pause: 2 * time.Millisecond}
	}
	got := sha256.New()
	m, err := io.Copy(got, r)
	if err != nil {
		return fmt.Errorf("read after %d bytes: %w", m, err)
	}
	want := sha256.New()
	if _, err := io.CopyN(want, stream.New(seed), n); err != nil {
		return err
	}
	if m != n || hex.EncodeToString(got.Sum(nil)) != hex.EncodeToString(want.Sum(nil)) {
		return fmt.Errorf("got %d bytes with sha256 %x, want %d bytes with sha256 %x", m, got.Sum(nil), n, want.Sum(nil))
	}
	return nil
}

// slowReader reads at most chunk bytes then pauses: a host reader slower than the guest writer.
type slowReader struct {
	r     io.Reader
	chunk int
	pause time.Duration
}

func (s *slowReader) Read(p []byte) (int, error) {
	time.Sleep(s.pause)
	if len(p) > s.chunk {
		p = p[:s.chunk]
	}
	return s.r.Read(p)
}

func TestVsockDataPath(t *testing.T) {
	m := bootTestGuest(t)
	const bulk = 256 << 20

	t.Run("256MiB host to guest", func(t *testing.T) {
		want, got, err := sendToSink(dial(t, m, sinkPort), 1, bulk)
		if err != nil {
			t.Fatal(err)
		}
		if got != want {
			t.Fatalf("guest sink got %q, host sent %q", got, want)
		}
	})

	t.Run("256MiB guest to host", func(t *testing.T) {
		if err := readFromSource(dial(t, m, sourcePort), 2, bulk, false); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("64 concurrent streams", func(t *testing.T) {
		const streams, size = 64, 1 << 20
		var wg sync.WaitGroup
		errs := make(chan error, streams)
		for i := range streams {
			wg.Add(1)
			go func() {
				defer wg.Done()
				c := dial(t, m, echoPort)
				defer c.Close()
				seed := uint64(1000 + i)
				sent := sha256.New()
				go func() {
					_, _ = io.CopyN(io.MultiWriter(c, sent), stream.New(seed), size)
					_ = c.(halfCloser).CloseWrite()
				}()
				got := sha256.New()
				n, err := io.Copy(got, c)
				if err != nil {
					errs <- fmt.Errorf("stream %d: read after %d bytes: %w", i, n, err)
					return
				}
				want := sha256.New()
				_, _ = io.CopyN(want, stream.New(seed), size)
				if n != size || string(got.Sum(nil)) != string(want.Sum(nil)) {
					errs <- fmt.Errorf("stream %d: echoed %d bytes, checksum mismatch=%v", i, n, string(got.Sum(nil)) != string(want.Sum(nil)))
				}
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Error(err)
		}
	})

	t.Run("guest-initiated connection", func(t *testing.T) {
		const hostPort = 7070
		l, err := net.Listen("unix", m.VsockPath()+"_"+strconv.Itoa(hostPort))
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		go func() {
			c, err := l.Accept()
			if err != nil {
				return
			}
			defer c.Close()
			line, _ := bufio.NewReader(c).ReadString('\n')
			fmt.Fprintf(c, "host heard: %s", line)
		}()
		c := dial(t, m, dialBackPort)
		defer c.Close()
		fmt.Fprintf(c, "%d\n", hostPort)
		_ = c.SetReadDeadline(time.Now().Add(20 * time.Second))
		reply, err := bufio.NewReader(c).ReadString('\n')
		if err != nil {
			t.Fatalf("read relayed reply: %v", err)
		}
		if reply != "host heard: hello from guest\n" {
			t.Fatalf("relayed reply %q", reply)
		}
	})

	t.Run("guest-initiated connection to a closed port is refused", func(t *testing.T) {
		c := dial(t, m, dialBackPort)
		defer c.Close()
		fmt.Fprintf(c, "%d\n", 7071)
		_ = c.SetReadDeadline(time.Now().Add(20 * time.Second))
		// The guest's dial fails (RST), so it closes the control connection without relaying a line.
		reply, err := bufio.NewReader(c).ReadString('\n')
		if err == nil {
			t.Fatalf("guest relayed %q from a port nobody listens on", reply)
		}
	})

	t.Run("slow guest reader", func(t *testing.T) {
		want, got, err := sendToSink(dial(t, m, slowSinkPort), 3, 32<<20)
		if err != nil {
			t.Fatal(err)
		}
		if got != want {
			t.Fatalf("slow guest sink got %q, host sent %q", got, want)
		}
	})

	t.Run("guest socket with a small buffer", func(t *testing.T) {
		// Linux caps its unacknowledged bytes at its own 64 KiB buffer here; before the back end sized its credit
		// updates to that window, the stream stopped after 64 KiB for good.
		c := dial(t, m, smallBufferSourcePort)
		_ = c.SetReadDeadline(time.Now().Add(60 * time.Second))
		if err := readFromSource(c, 5, 32<<20, false); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("slow host reader", func(t *testing.T) {
		if err := readFromSource(dial(t, m, sourcePort), 4, 32<<20, true); err != nil {
			t.Fatal(err)
		}
	})
}
