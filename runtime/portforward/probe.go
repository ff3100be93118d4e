package portforward

import (
	"fmt"
	"runtime"

	"golang.org/x/sys/unix"
)

// Probe reports whether this host can steer port-forward connections: it attaches the program to a network
// namespace of its own, made for the purpose, and removes both again.
func Probe() error {
	type made struct {
		path string
		err  error
	}
	ready := make(chan made, 1)
	done := make(chan struct{})
	defer close(done)
	go func() {
		// The thread holds the namespace while the probe uses it and is then thrown away with it: it is never
		// unlocked, so no other goroutine ever runs in that namespace.
		runtime.LockOSThread()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			ready <- made{err: fmt.Errorf("create a network namespace: %w", err)}
			return
		}
		ready <- made{path: fmt.Sprintf("/proc/%d/task/%d/ns/net", unix.Getpid(), unix.Gettid())}
		<-done
	}()
	m := <-ready
	if m.err != nil {
		return m.err
	}
	s, err := steer(m.path)
	if err != nil {
		return err
	}
	s.Close()
	return nil
}
