package vhostuser

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/kiln-runtime/kiln/vm/virtqueue"
)

// countingDevice is a vsock-shaped device (2 queues, le64 CID config) that counts what QEMU asked of it.
type countingDevice struct {
	configReads atomic.Int32
}

func (d *countingDevice) NumQueues() int   { return 2 }
func (d *countingDevice) Features() uint64 { return 0 }
func (d *countingDevice) Config() []byte {
	d.configReads.Add(1)
	return []byte{42, 0, 0, 0, 0, 0, 0, 0}
}
func (d *countingDevice) Start([]*virtqueue.Queue) error { return nil }
func (d *countingDevice) Stop()                          {}

// qmp is a minimal QMP client: one command at a time, events skipped.
type qmp struct {
	c net.Conn
	r *bufio.Reader
}

func dialQMP(path string, deadline time.Time) (*qmp, error) {
	var c net.Conn
	var err error
	for time.Now().Before(deadline) {
		if c, err = net.Dial("unix", path); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		return nil, fmt.Errorf("dial qmp %s: %w", path, err)
	}
	c.SetDeadline(deadline)
	q := &qmp{c: c, r: bufio.NewReader(c)}
	if _, err := q.r.ReadBytes('\n'); err != nil { // greeting
		return nil, fmt.Errorf("read qmp greeting: %w", err)
	}
	if _, err := q.run("qmp_capabilities", nil); err != nil {
		return nil, err
	}
	return q, nil
}

func (q *qmp) run(cmd string, args any) (json.RawMessage, error) {
	req := map[string]any{"execute": cmd}
	if args != nil {
		req["arguments"] = args
	}
	if err := json.NewEncoder(q.c).Encode(req); err != nil {
		return nil, fmt.Errorf("send qmp %s: %w", cmd, err)
	}
	for {
		line, err := q.r.ReadBytes('\n')
		if err != nil {
			return nil, fmt.Errorf("read qmp %s reply: %w", cmd, err)
		}
		var resp struct {
			Return json.RawMessage `json:"return"`
			Error  *struct {
				Desc string `json:"desc"`
			} `json:"error"`
		}
		if err := json.Unmarshal(line, &resp); err != nil {
			return nil, fmt.Errorf("decode qmp %s reply %q: %w", cmd, line, err)
		}
		if resp.Error != nil {
			return nil, fmt.Errorf("qmp %s: %s", cmd, resp.Error.Desc)
		}
		if resp.Return != nil {
			return resp.Return, nil
		}
	}
}

// TestQEMURealizesVhostUserVsock starts a real QEMU microVM (paused, no kernel) with vhost-user-vsock-device
// against Serve and checks that QEMU completed the feature/config handshake and realized the device.
func TestQEMURealizesVhostUserVsock(t *testing.T) {
	qemu, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		t.Skip("qemu-system-x86_64 not installed")
	}
	dir := t.TempDir()
	sock, qmpSock := filepath.Join(dir, "vsock.sock"), filepath.Join(dir, "qmp.sock")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()

	logger := logrus.New()
	logger.SetLevel(logrus.TraceLevel)
	logger.SetOutput(testWriter{t})
	dev := &countingDevice{}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	served := make(chan error, 1)
	go func() { served <- Serve(ctx, l, dev, GuestRAM{}, logrus.NewEntry(logger)) }()

	cmd := exec.CommandContext(ctx, qemu,
		"-M", "microvm,pit=on,pic=on,rtc=on,memory-backend=mem",
		"-m", "256M",
		"-object", "memory-backend-memfd,id=mem,size=256M,share=on",
		"-global", "virtio-mmio.force-legacy=false",
		"-chardev", "socket,id=c0,path="+sock,
		"-device", "vhost-user-vsock-device,chardev=c0",
		"-nodefaults", "-no-user-config", "-nographic", "-S",
		"-qmp", "unix:"+qmpSock+",server=on,wait=off",
	)
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatalf("start qemu: %v", err)
	}
	// exited is closed once QEMU is reaped, so any number of waits can observe it.
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	defer func() {
		cmd.Process.Kill()
		<-exited
	}()

	q, err := dialQMP(qmpSock, time.Now().Add(30*time.Second))
	if err != nil {
		cmd.Process.Kill()
		<-exited
		t.Fatalf("%v\nqemu output:\n%s", err, out.String())
	}
	tree, err := q.run("human-monitor-command", map[string]any{"command-line": "info qtree"})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(tree), "vhost-user-vsock-device") {
		t.Fatalf("device not in qtree:\n%s", tree)
	}
	if n := dev.configReads.Load(); n == 0 {
		t.Fatal("QEMU realized the device without reading its config (GET_CONFIG)")
	}
	if _, err := q.run("quit", nil); err != nil && !strings.Contains(err.Error(), "EOF") {
		t.Logf("qmp quit: %v", err)
	}
	select {
	case <-exited:
	case <-time.After(10 * time.Second):
		t.Error("qemu did not quit")
	}
	select {
	case err := <-served:
		if err != nil {
			t.Fatalf("Serve after QEMU quit: %v\nqemu output:\n%s", err, out.String())
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Serve did not return after QEMU quit")
	}
}

// testWriter sends log lines to the test log.
type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}
