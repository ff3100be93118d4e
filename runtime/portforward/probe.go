package portforward

import (
	"errors"
	"fmt"
	"os"
	"runtime"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Probe reports whether this host can steer port-forward connections: it attaches the program to a network
// namespace of its own, made for the purpose, and removes both again.
func Probe() error {
	ns, err := newNamespace()
	if err != nil {
		return err
	}
	defer ns.Close()
	s, err := steer(fmt.Sprintf("/proc/self/fd/%d", ns.Fd()))
	if err != nil {
		return err
	}
	s.Close()
	return nil
}

// newNamespace makes a network namespace and returns a descriptor of it, which keeps it alive. The thread that
// makes it goes back to its own namespace afterwards instead of ending (see inNamespace).
func newNamespace() (*os.File, error) {
	type made struct {
		f   *os.File
		err error
	}
	done := make(chan made, 1)
	go func() {
		runtime.LockOSThread()
		home, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			done <- made{err: fmt.Errorf("open the current network namespace: %w", err)}
			return
		}
		defer home.Close()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			done <- made{err: fmt.Errorf("create a network namespace: %w", err)}
			return
		}
		f, ferr := os.Open(fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid()))
		if err := netns.Set(home); err != nil {
			if f != nil {
				f.Close()
			}
			done <- made{err: errors.Join(ferr, fmt.Errorf("return from the new network namespace: %w", err))}
			return
		}
		runtime.UnlockOSThread()
		done <- made{f, ferr}
	}()
	m := <-done
	return m.f, m.err
}
