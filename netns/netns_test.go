package netns

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// TestEntryPointsRunInTheNamespaceAndEndNoThread runs fn through each entry point many times, and once failing:
// fn runs in the namespace asked for, its error comes back as it is, and afterwards every thread of the process is back in the test's namespace and none
// ended: the kernel sends a parent-death signal when the thread that forked a child ends, whichever it was (a CRI
// pod's VM died at boot when the shim's port-forward set-up ended a thread, and a container's init could die the
// same way when the agent dials into the pod's namespace).
func TestEntryPointsRunInTheNamespaceAndEndNoThread(t *testing.T) {
	needRoot(t)
	home := inode(t, "/proc/thread-self/ns/net")
	target := newNamespace(t)
	targetPath := fmt.Sprintf("/proc/self/fd/%d", target)
	targetIno := inode(t, targetPath)
	for _, tc := range []struct {
		name string
		// do runs fn through the entry point and returns the inode fn's thread was in and the one it expected.
		do func(fn func() error) (want uint64, err error)
	}{
		{"Do", func(fn func() error) (uint64, error) { return targetIno, Do(target, fn) }},
		{"DoPath", func(fn func() error) (uint64, error) { return targetIno, DoPath(targetPath, fn) }},
		{"DoNew", func(fn func() error) (uint64, error) {
			var want uint64
			err := DoNew(func(path string) error {
				var st unix.Stat_t
				if err := unix.Stat(path, &st); err != nil {
					return err
				}
				want = st.Ino
				return fn()
			})
			if err == nil && (want == home || want == targetIno) {
				err = fmt.Errorf("DoNew's namespace %d is not new", want)
			}
			return want, err
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := threads(t)
			for range 20 {
				var in uint64
				want, err := tc.do(func() error {
					var st unix.Stat_t
					err := unix.Stat("/proc/thread-self/ns/net", &st)
					in = st.Ino
					return err
				})
				if err != nil {
					t.Fatal(err)
				}
				if in != want {
					t.Fatalf("fn ran in namespace %d, want %d", in, want)
				}
			}
			failed := errors.New("fn failed")
			if _, err := tc.do(func() error { return failed }); err != failed {
				t.Errorf("error %v, want fn's own", err)
			}
			checkThreads(t, before, home)
		})
	}
}

// A namespace that cannot be entered fails naming it, fn does not run and the thread stays.
func TestEnterFailureRunsNothing(t *testing.T) {
	needRoot(t)
	home := inode(t, "/proc/thread-self/ns/net")
	notANamespace, err := os.Open("/")
	if err != nil {
		t.Fatal(err)
	}
	defer notANamespace.Close()
	for _, tc := range []struct {
		name, want string
		do         func(fn func() error) error
	}{
		{"Do", "enter network namespace: ", func(fn func() error) error { return Do(netns.NsHandle(notANamespace.Fd()), fn) }},
		{"DoPath", "enter network namespace /: ", func(fn func() error) error { return DoPath("/", fn) }},
		{"DoPath missing", "open network namespace /nonexistent/ns: ", func(fn func() error) error { return DoPath("/nonexistent/ns", fn) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := threads(t)
			ran := false
			err := tc.do(func() error { ran = true; return nil })
			if err == nil || !strings.HasPrefix(err.Error(), tc.want) {
				t.Errorf("error %v, want one starting %q", err, tc.want)
			}
			if ran {
				t.Error("fn ran")
			}
			checkThreads(t, before, home)
		})
	}
}

// An enter that moved the thread before it failed (netns.New: unshare, then an open that fails) is undone: the
// thread goes back before another goroutine gets it, and fn does not run.
func TestFailedEnterGoesBack(t *testing.T) {
	needRoot(t)
	home := inode(t, "/proc/thread-self/ns/net")
	target := newNamespace(t)
	before := threads(t)
	err := run("network namespace x", func() (func(), error) {
		if err := netns.Set(target); err != nil {
			return nil, err
		}
		return nil, unix.EMFILE
	}, func() error { t.Error("fn ran"); return nil }, netns.Set)
	if !errors.Is(err, unix.EMFILE) || !strings.HasPrefix(err.Error(), "enter network namespace x: ") {
		t.Errorf("error %v, want the failed enter's", err)
	}
	checkThreads(t, before, home)
}

// A thread that cannot go back is never given to another goroutine: it ends, and the error says why, with fn's.
func TestFailedReturnDiscardsTheThread(t *testing.T) {
	needRoot(t)
	home := inode(t, "/proc/thread-self/ns/net")
	target := newNamespace(t)
	failed := errors.New("fn failed")
	var tid int
	err := run("network namespace x", func() (func(), error) { return func() {}, netns.Set(target) },
		func() error { tid = unix.Gettid(); return failed },
		func(netns.NsHandle) error { return unix.EPERM })
	if !errors.Is(err, failed) || !errors.Is(err, unix.EPERM) || !strings.Contains(err.Error(), "return from network namespace x: ") {
		t.Errorf("error %v, want fn's and the failed return's", err)
	}
	waitEnded(tid)
	checkThreads(t, nil, home)
}

// The main goroutine keeps the main thread: the runtime wedges the main thread rather than end it when a goroutine
// exits locked to it, so a test that discards threads must never be given that one.
func init() {
	runtime.LockOSThread()
}

// waitEnded waits for the thread tid to end; the runtime ends a locked thread as its goroutine exits. The test's
// timeout bounds the wait.
func waitEnded(tid int) {
	task := fmt.Sprintf("/proc/self/task/%d", tid)
	for {
		if _, err := os.Stat(task); errors.Is(err, os.ErrNotExist) {
			return
		}
		time.Sleep(time.Millisecond)
	}
}

func needRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to create network namespaces")
	}
}

// newNamespace makes a network namespace on a thread that it then discards, and returns a handle to it that is
// closed when the test ends.
func newNamespace(t *testing.T) netns.NsHandle {
	t.Helper()
	type made struct {
		ns  netns.NsHandle
		tid int
		err error
	}
	done := make(chan made, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread ends in the new namespace
		ns, err := netns.New()
		done <- made{ns, unix.Gettid(), err}
	}()
	m := <-done
	if m.err != nil {
		t.Fatal(m.err)
	}
	waitEnded(m.tid)
	t.Cleanup(func() { _ = m.ns.Close() })
	return m.ns
}

// inode is the inode of the namespace file at path.
func inode(t *testing.T, path string) uint64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

// checkThreads checks that every thread in before still runs and every thread of the process is in the network
// namespace home.
func checkThreads(t *testing.T, before map[string]bool, home uint64) {
	t.Helper()
	now := threads(t)
	for tid := range before {
		if !now[tid] {
			t.Errorf("thread %s of the process ended", tid)
		}
	}
	for tid := range now {
		var st unix.Stat_t
		if err := unix.Stat("/proc/self/task/"+tid+"/ns/net", &st); err != nil {
			continue // the thread ended meanwhile
		}
		if st.Ino != home {
			t.Errorf("thread %s is in network namespace %d, not the test's %d", tid, st.Ino, home)
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
