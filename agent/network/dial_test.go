package network

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"github.com/sirupsen/logrus"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// listenInPod listens on addr inside the pod namespace.
func listenInPod(t *testing.T, path, network, addr string) net.Listener {
	t.Helper()
	type result struct {
		l   net.Listener
		err error
	}
	done := make(chan result, 1)
	go func() {
		// Back to the test's namespace afterwards, so that no thread ends (see TestDialLoopbackEndsNoThread).
		runtime.LockOSThread()
		home, err := netns.Get()
		if err != nil {
			done <- result{err: err}
			return
		}
		defer home.Close()
		ns, err := netns.GetFromPath(path)
		if err == nil {
			err = netns.Set(ns)
			ns.Close()
		}
		if err != nil {
			done <- result{err: err}
			return
		}
		l, lerr := net.Listen(network, addr)
		if err := netns.Set(home); err != nil {
			done <- result{err: err}
			return
		}
		runtime.UnlockOSThread()
		done <- result{l, lerr}
	}()
	r := <-done
	if r.err != nil {
		t.Fatal(r.err)
	}
	t.Cleanup(func() { r.l.Close() })
	return r.l
}

// DialLoopback reaches a port of the pod namespace, over IPv6 when nothing listens on 127.0.0.1, and never the
// agent's own namespace.
func TestDialLoopback(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to create network namespaces")
	}
	p := New(filepath.Join(t.TempDir(), "pod"), logrus.NewEntry(logrus.StandardLogger()))
	ctx := context.Background()
	if _, err := p.DialLoopback(ctx, 80); err == nil || !strings.Contains(err.Error(), "no network namespace") {
		t.Errorf("dial before the namespace exists: %v", err)
	}
	path, err := p.Path()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = unix.Unmount(path, unix.MNT_DETACH) })

	// A port open in the test's own namespace only is not the pod's.
	outside, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer outside.Close()
	outsidePort := uint16(outside.Addr().(*net.TCPAddr).Port)
	if c, err := p.DialLoopback(ctx, outsidePort); err == nil {
		c.Close()
		t.Errorf("port %d of the agent's namespace reached through the pod's", outsidePort)
	}

	for _, tc := range []struct{ network, addr string }{
		{"tcp4", "127.0.0.1:0"},
		{"tcp6", "[::1]:0"},
	} {
		l := listenInPod(t, path, tc.network, tc.addr)
		port := uint16(l.Addr().(*net.TCPAddr).Port)
		accepted := make(chan net.Conn, 1)
		go func() {
			c, _ := l.Accept()
			accepted <- c
		}()
		c, err := p.DialLoopback(ctx, port)
		if err != nil {
			t.Fatalf("%s: %v", tc.network, err)
		}
		s := <-accepted
		if s == nil {
			t.Fatalf("%s: nothing accepted", tc.network)
		}
		fmt.Fprint(c, "hi")
		c.Close()
		if b, err := io.ReadAll(s); err != nil || string(b) != "hi" {
			t.Errorf("%s: read %q, %v", tc.network, b, err)
		}
		s.Close()
	}
}

// Dialling must not end a thread of the agent: the kernel sends a container's init its parent-death signal when
// the thread that forked it ends, whichever thread that was.
func TestDialLoopbackEndsNoThread(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to create network namespaces")
	}
	p := New(filepath.Join(t.TempDir(), "pod"), logrus.NewEntry(logrus.StandardLogger()))
	path, err := p.Path()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = unix.Unmount(path, unix.MNT_DETACH) })
	l := listenInPod(t, path, "tcp4", "127.0.0.1:0")
	port := uint16(l.Addr().(*net.TCPAddr).Port)
	before := threads(t)
	for i := 0; i < 20; i++ {
		c, err := p.DialLoopback(context.Background(), port)
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
	}
	after := threads(t)
	for tid := range before {
		if !after[tid] {
			t.Errorf("thread %s of the process ended", tid)
		}
	}
}

// threads lists the process's threads.
func threads(t *testing.T) map[string]bool {
	t.Helper()
	entries, err := os.ReadDir("/proc/self/task")
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]bool{}
	for _, e := range entries {
		m[e.Name()] = true
	}
	return m
}
