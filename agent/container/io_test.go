package container

import (
	"net"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/runc/libcontainer"
	"github.com/sirupsen/logrus"

	"github.com/kiln-runtime/kiln/agent/stdio"
	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"

	"golang.org/x/sys/unix"
)

// The pty master arrives the way runc's init sends it: the file's name as
// data, the descriptor as SCM_RIGHTS.
func TestReceiveMaster(t *testing.T) {
	pair, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	parent, child := os.NewFile(uintptr(pair[0]), "parent"), os.NewFile(uintptr(pair[1]), "child")
	defer parent.Close()
	defer child.Close()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer w.Close()
	if err := unix.Sendmsg(int(child.Fd()), []byte("/dev/ptmx"), unix.UnixRights(int(r.Fd())), nil, 0); err != nil {
		t.Fatal(err)
	}
	got, err := receiveMaster(parent)
	if err != nil {
		t.Fatal(err)
	}
	defer got.Close()
	if _, err := w.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 1)
	if n, err := got.Read(buf); err != nil || n != 1 || buf[0] != 'x' {
		t.Fatalf("read from the received descriptor: %d %q %v", n, buf, err)
	}
	flags, err := unix.FcntlInt(got.Fd(), unix.F_GETFD, 0)
	if err != nil || flags&unix.FD_CLOEXEC == 0 {
		t.Errorf("received descriptor flags %#x (%v), want close-on-exec", flags, err)
	}

	// A message without a descriptor is an error.
	if _, err := child.Write([]byte("no fd")); err != nil {
		t.Fatal(err)
	}
	if f, err := receiveMaster(parent); err == nil {
		f.Close()
		t.Fatal("a message without a descriptor was accepted")
	}
}

// A process that exited while the host took no more of its output (a stalled reader on the host, the
// connection's credit spent) is still reported: finish gives up on the blocked copy after the host timeout
// instead of waiting forever, which would leave the container unkillable.
func TestFinishDoesNotWaitForAStalledHost(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	guest, host := net.Pipe() // nothing reads host: every write to guest blocks
	defer host.Close()
	p := &processIO{
		log:         logrus.NewEntry(logrus.StandardLogger()),
		conns:       map[stdio.Stream]net.Conn{stdio.Stdout: guest},
		outputs:     map[stdio.Stream]*os.File{stdio.Stdout: r},
		stdinClose:  make(chan struct{}),
		exited:      make(chan struct{}),
		inputClosed: make(chan struct{}),
		hostTimeout: 200 * time.Millisecond,
	}
	var writer sync.WaitGroup
	writer.Go(func() {
		_, _ = w.Write(make([]byte, 256<<10))
		w.Close() // the process exits
	})
	p.copies.Add(1)
	go p.copyOutput(stdio.Stdout, r, guest)
	// The process has written what fit in its pipe and is gone.
	time.Sleep(100 * time.Millisecond)
	done := make(chan struct{})
	go func() {
		p.finish()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(time.Minute):
		t.Fatal("finish still waits for a host that reads nothing")
	}
	writer.Wait()
}

// A process's output pipes hold outputPipeSize, its end and the agent's alike (they are one pipe); stdin's keeps
// the kernel's size.
func TestOutputPipesAreGrown(t *testing.T) {
	conns := map[stdio.Stream]net.Conn{}
	for _, st := range []stdio.Stream{stdio.Stdin, stdio.Stdout, stdio.Stderr} {
		agentEnd, hostEnd := net.Pipe()
		defer hostEnd.Close()
		conns[st] = agentEnd
	}
	lp := &libcontainer.Process{}
	p, err := newProcessIO(logrus.NewEntry(logrus.StandardLogger()), &agentv1.Stdio{}, conns, lp)
	if err != nil {
		t.Fatal(err)
	}
	defer p.abort()
	size := func(f any) int {
		t.Helper()
		file, ok := f.(*os.File)
		if !ok {
			t.Fatalf("%T, want a pipe", f)
		}
		n, err := unix.FcntlInt(file.Fd(), unix.F_GETPIPE_SZ, 0)
		if err != nil {
			t.Fatal(err)
		}
		return n
	}
	for name, tc := range map[string]struct {
		end  any
		want int
	}{
		"stdout, the agent's end": {p.outputs[stdio.Stdout], outputPipeSize},
		"stderr, the agent's end": {p.outputs[stdio.Stderr], outputPipeSize},
		"stdout, the process's":   {lp.Stdout, outputPipeSize},
		"stderr, the process's":   {lp.Stderr, outputPipeSize},
		"stdin, the process's":    {lp.Stdin, 64 << 10},
	} {
		if got := size(tc.end); got != tc.want {
			t.Errorf("%s: pipe of %d bytes, want %d", name, got, tc.want)
		}
	}
}
