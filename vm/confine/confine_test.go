package confine

import (
	"errors"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"unsafe"

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
	})
	// The rest of the process is not confined.
	s, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM, ipprotoMPTCP)
	if err == nil {
		unix.Close(s)
	}
	if errors.Is(err, unix.EACCES) {
		t.Errorf("a socket after the confined thread ended: %v", err)
	}
	if err := os.WriteFile(filepath.Join(dir, "after"), nil, 0o600); err != nil {
		t.Errorf("create a file after the confined thread ended: %v", err)
	}
}

// ipprotoMPTCP is Multipath TCP's protocol number, which Landlock's TCP rights do not cover.
const ipprotoMPTCP = 262

// The socket filter: UNIX and netlink sockets only: no internet socket of any protocol (Multipath TCP among
// them), no vsock, packet, SMC or RDS socket, and no io_uring (which makes sockets without socket(2)). Root keeps
// its exec transitions: no no_new_privs.
func TestThreadFiltersSockets(t *testing.T) {
	onConfinedThread(t, Policy{}, func(int) {
		for _, c := range []struct {
			name                  string
			family, typ, protocol int
		}{
			{"tcp", unix.AF_INET, unix.SOCK_STREAM, 0},
			{"mptcp", unix.AF_INET, unix.SOCK_STREAM, ipprotoMPTCP},
			{"udp6", unix.AF_INET6, unix.SOCK_DGRAM, 0},
			{"vsock", unix.AF_VSOCK, unix.SOCK_STREAM, 0},
			{"packet", unix.AF_PACKET, unix.SOCK_RAW, 0},
			{"smc", unix.AF_SMC, unix.SOCK_STREAM, 0},
			{"rds", unix.AF_RDS, unix.SOCK_SEQPACKET, 0},
		} {
			if s, err := unix.Socket(c.family, c.typ, c.protocol); !errors.Is(err, unix.EACCES) {
				t.Errorf("%s socket on the confined thread: %v, want EACCES", c.name, err)
				if err == nil {
					unix.Close(s)
				}
			}
		}
		if s, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW, unix.NETLINK_ROUTE); err != nil {
			t.Errorf("netlink socket on the confined thread: %v", err)
		} else {
			unix.Close(s)
		}
		if fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM, 0); err != nil {
			t.Errorf("socketpair on the confined thread: %v", err)
		} else {
			unix.Close(fds[0])
			unix.Close(fds[1])
		}
		params := make([]byte, 120) // struct io_uring_params
		if _, _, e := unix.Syscall(unix.SYS_IO_URING_SETUP, 4, uintptr(unsafe.Pointer(&params[0])), 0); e != unix.ENOSYS {
			t.Errorf("io_uring_setup on the confined thread: %v, want ENOSYS", e)
		}
		status, err := os.ReadFile("/proc/thread-self/status")
		if err != nil {
			t.Fatal(err)
		}
		if os.Geteuid() == 0 && !strings.Contains(string(status), "NoNewPrivs:\t0") {
			t.Errorf("a thread with CAP_SYS_ADMIN got no_new_privs")
		}
	})
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
