package container

import (
	"os"
	"testing"

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
