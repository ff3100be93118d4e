// Package standin gives each container of a pod a stand-in on the host: an OS thread of the shim whose task id
// is what containerd's clients get as the container's pid. They read that pid as a host process's: nerdctl cp
// copies through /proc/<pid>/root, cAdvisor counts a pod's traffic from /proc/<pid>/net/dev, nerdctl inspect and
// `ctr run --cni` enter /proc/<pid>/ns/net, and CRI names a pod's namespaces /proc/<sandbox pid>/ns/<type>. The
// processes themselves run in the guest, with the guest's pids, which on the host name unrelated processes
// (kernel threads, in the host's root and network namespace). A stand-in's root directory is the container's
// root file system as the host shares it with the guest, and its network namespace is the pod's, so those
// paths lead where they would for a runc container, or to nothing of the host's.
//
// The threads never end: a child started with a parent-death signal (QEMU, virtiofsd, the namespace holder)
// gets it when the thread that forked it ends, and a stand-in's thread may have forked one before it was
// locked to its stand-in. A closed stand-in's thread goes back to the shim's root directory and network
// namespace and waits in its Pool for the next container.
package standin

import (
	"fmt"
	"os"
	"runtime"
	"sync"

	"golang.org/x/sys/unix"
)

// Pool holds the threads of a pod's stand-ins, those in use and those waiting for a container.
type Pool struct {
	// host and hostNet are the shim's root directory and network namespace, where a thread goes back to.
	host, hostNet *os.File

	mu   sync.Mutex
	idle []*worker
}

// NewPool opens what a closed stand-in's thread goes back to. The pool lives as long as the shim: its threads
// and those two descriptors are never released.
func NewPool() (*Pool, error) {
	host, err := os.Open("/")
	if err != nil {
		return nil, fmt.Errorf("stand-ins: open the shim's root directory: %w", err)
	}
	hostNet, err := os.Open("/proc/self/ns/net")
	if err != nil {
		host.Close()
		return nil, fmt.Errorf("stand-ins: open the shim's network namespace: %w", err)
	}
	return &Pool{host: host, hostNet: hostNet}, nil
}

// worker is a thread locked to a goroutine that runs stand-ins one after another.
type worker struct {
	tid  int
	jobs chan *Thread
}

// Thread is a container's stand-in (see the package comment).
type Thread struct {
	root     string
	netns    *os.File
	w        *worker
	started  chan error
	stop     chan struct{}
	stopOnce sync.Once
	// done is closed once the thread has left the container's root directory and namespace, or failed to
	// (left).
	done chan struct{}
	left error
}

// Start starts a stand-in whose root directory is root and whose network namespace is netns, or a new, empty
// one when netns is nil: never the host's, where a client (`ctr run --cni`) would configure the host's network
// for the container.
func (p *Pool) Start(root string, netns *os.File) (*Thread, error) {
	t := &Thread{root: root, netns: netns, started: make(chan error, 1), stop: make(chan struct{}), done: make(chan struct{})}
	p.mu.Lock()
	var w *worker
	if n := len(p.idle); n > 0 {
		w, p.idle = p.idle[n-1], p.idle[:n-1]
	}
	p.mu.Unlock()
	if w == nil {
		w = &worker{jobs: make(chan *Thread)}
		ready := make(chan error, 1)
		go p.run(w, ready)
		if err := <-ready; err != nil {
			return nil, fmt.Errorf("start the container's stand-in: %w", err)
		}
	}
	t.w = w
	w.jobs <- t
	if err := <-t.started; err != nil {
		<-t.done
		return nil, fmt.Errorf("start the container's stand-in (root %s): %w", root, err)
	}
	return t, nil
}

// run locks a new worker's goroutine to a thread other than the main one (whose /proc entry is the whole
// process's) and serves stand-ins on it.
func (p *Pool) run(w *worker, ready chan<- error) {
	runtime.LockOSThread()
	if unix.Gettid() == unix.Getpid() {
		// Hand over to a goroutine started while this one holds the main thread, so that it runs on another.
		moved := make(chan struct{})
		go func() {
			runtime.LockOSThread()
			close(moved)
			p.serve(w, ready)
		}()
		<-moved
		runtime.UnlockOSThread()
		return
	}
	p.serve(w, ready)
}

// serve runs on the worker's thread, locked to it for good (see the package comment).
func (p *Pool) serve(w *worker, ready chan<- error) {
	// The thread's own root directory and cwd: until then they are the whole process's.
	if err := unix.Unshare(unix.CLONE_FS); err != nil {
		ready <- fmt.Errorf("unshare the thread's file system attributes: %w", err)
		runtime.UnlockOSThread()
		return
	}
	w.tid = unix.Gettid()
	ready <- nil
	for t := range w.jobs {
		err := enter(t.root, t.netns)
		t.started <- err
		if err == nil {
			<-t.stop
		}
		t.left = p.leave()
		if t.left != nil {
			close(t.done)
			// Neither reused nor ended (see the package comment): it waits for the shim's end.
			select {}
		}
		// Idle before Close returns, so that the next Start takes this thread rather than a new one.
		p.mu.Lock()
		p.idle = append(p.idle, w)
		p.mu.Unlock()
		close(t.done)
	}
}

// enter gives the calling thread the network namespace (a new one for nil), then the root directory.
func enter(root string, netns *os.File) error {
	if netns == nil {
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			return fmt.Errorf("new network namespace: %w", err)
		}
	} else if err := unix.Setns(int(netns.Fd()), unix.CLONE_NEWNET); err != nil {
		return fmt.Errorf("join network namespace %s: %w", netns.Name(), err)
	}
	if err := unix.Chroot(root); err != nil {
		return fmt.Errorf("chroot: %w", err)
	}
	return unix.Chdir("/")
}

// leave takes the calling thread back to the shim's root directory, cwd and network namespace.
func (p *Pool) leave() error {
	if err := unix.Fchdir(int(p.host.Fd())); err != nil {
		return err
	}
	if err := unix.Chroot("."); err != nil {
		return err
	}
	return unix.Setns(int(p.hostNet.Fd()), unix.CLONE_NEWNET)
}

// Pid is the stand-in's task id, the container's pid for containerd.
func (t *Thread) Pid() uint32 { return uint32(t.w.tid) }

// NetNS opens the stand-in's network namespace.
func (t *Thread) NetNS() (*os.File, error) {
	return os.Open(fmt.Sprintf("/proc/self/task/%d/ns/net", t.w.tid))
}

// Close ends the stand-in; once it returns without error the thread no longer holds the container's root file
// system, which can then be unmounted.
func (t *Thread) Close() error {
	t.stopOnce.Do(func() { close(t.stop) })
	<-t.done
	if t.left != nil {
		return fmt.Errorf("stand-in %d: back to the shim's root and network namespace: %w", t.w.tid, t.left)
	}
	return nil
}
