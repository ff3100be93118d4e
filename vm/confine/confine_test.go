package confine

import (
	"errors"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"testing"

	"golang.org/x/sys/unix"
)

// onConfinedThread runs f on a thread Policy.Thread restricted, which then ends.
func onConfinedThread(t *testing.T, p Policy, f func(abi int)) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		defer close(done)
		runtime.LockOSThread() // never unlocked: the thread ends with the goroutine
		abi, err := p.Thread()
		if err != nil {
			t.Errorf("Thread: %v", err)
			return
		}
		f(abi)
	}()
	<-done
}

func TestThreadConfinesOnlyItself(t *testing.T) {
	if ABI() == 0 {
		t.Skip("the kernel has no Landlock")
	}
	dir := t.TempDir()
	writable := filepath.Join(dir, "ram")
	if err := os.WriteFile(writable, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	onConfinedThread(t, Policy{Writable: []string{writable}}, func(abi int) {
		if abi != ABI() {
			t.Errorf("Thread enforced ABI %d, the kernel has %d", abi, ABI())
		}
		// Raw system calls: they stay on this thread, where Go's file functions might hand the work to another.
		if fd, err := unix.Open(filepath.Join(dir, "new"), unix.O_CREAT|unix.O_WRONLY, 0o600); !errors.Is(err, unix.EACCES) {
			t.Errorf("create a file on the confined thread: %v, want EACCES", err)
			unix.Close(fd)
		}
		if err := unix.Unlink(writable); !errors.Is(err, unix.EACCES) {
			t.Errorf("remove a file on the confined thread: %v, want EACCES", err)
		}
		fd, err := unix.Open(writable, unix.O_WRONLY|unix.O_TRUNC, 0)
		if err != nil {
			t.Errorf("open the writable file for writing: %v", err)
		} else {
			unix.Close(fd)
		}
		if fd, err := unix.Open(filepath.Join(dir, "ram"), unix.O_RDONLY, 0); err != nil {
			t.Errorf("read a file on the confined thread: %v", err)
		} else {
			unix.Close(fd)
		}
		if abi >= 4 {
			s, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer unix.Close(s)
			port := l.Addr().(*net.TCPAddr).Port
			if err := unix.Connect(s, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}, Port: port}); !errors.Is(err, unix.EACCES) {
				t.Errorf("connect to a host TCP listener on the confined thread: %v, want EACCES", err)
			}
		}
	})
	// The rest of the process is not confined.
	if err := os.WriteFile(filepath.Join(dir, "after"), nil, 0o600); err != nil {
		t.Errorf("create a file after the confined thread ended: %v", err)
	}
}

func TestThreadRefusesAWritableFileThatIsNotThere(t *testing.T) {
	if ABI() == 0 {
		t.Skip("the kernel has no Landlock")
	}
	onConfinedThreadErr := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		_, err := Policy{Writable: []string{filepath.Join(t.TempDir(), "missing")}}.Thread()
		onConfinedThreadErr <- err
	}()
	if err := <-onConfinedThreadErr; err == nil {
		t.Error("Thread with a missing writable file succeeded")
	}
}
