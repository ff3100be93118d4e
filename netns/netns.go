// Package netns runs a function inside a Linux network namespace, for the host runtime and the guest agent alike.
// It owns only the locked-thread pattern that entering a namespace needs; namespace handles are
// github.com/vishvananda/netns's. It knows nothing of pods, taps or port forwarding.
//
// A namespace belongs to a thread, not to a goroutine, so the function runs on a locked OS thread of its own,
// which then goes back to the namespace it came from and back to the scheduler. Ending the thread instead (by
// leaving it locked, the usual way) is not safe here: QEMU in the shim and a container's init in the agent are
// started with a parent-death signal, which the kernel sends when the thread that forked them ends, and any
// thread may be that one. Only when the way back fails does the thread stay locked, so that Go discards it and no
// other goroutine ever runs in the wrong namespace.
package netns

import (
	"errors"
	"fmt"
	"runtime"

	"github.com/vishvananda/netns"
)

// Do runs fn on a thread that has entered the network namespace ns, then moves the thread back. fn's error is
// returned as it is; an error entering or leaving the namespace is added to it. When the error is not nil, fn may
// still have run and made something that the caller must release.
func Do(ns netns.NsHandle, fn func() error) error {
	return run("network namespace", func() (func(), error) { return func() {}, netns.Set(ns) }, fn, netns.Set)
}

// DoPath runs fn on a thread that has entered the network namespace at path (a bind mount, /proc/<pid>/ns/net),
// then moves the thread back, as Do does.
func DoPath(path string, fn func() error) error {
	ns, err := netns.GetFromPath(path)
	if err != nil {
		return fmt.Errorf("open network namespace %s: %w", path, err)
	}
	defer ns.Close()
	return run("network namespace "+path, func() (func(), error) { return func() {}, netns.Set(ns) }, fn, netns.Set)
}

// DoNew makes a network namespace and runs fn on a thread inside it, then moves the thread back, as Do does.
// path names the new namespace while fn runs: fn keeps the namespace alive past its return by opening or
// bind-mounting path; otherwise the namespace ends with fn.
func DoNew(fn func(path string) error) error {
	var path string
	return run("a new network namespace", func() (func(), error) {
		ns, err := netns.New()
		if err != nil {
			return nil, err
		}
		path = fmt.Sprintf("/proc/self/fd/%d", ns)
		return func() { _ = ns.Close() }, nil
	}, func() error { return fn(path) }, netns.Set)
}

// run runs fn on a locked thread between enter and restore (given the thread's own namespace); name says what
// enter enters, for errors. enter returns what to release once fn has run. A thread that cannot be restored
// stays locked and ends with its goroutine. restore is a parameter so that its failure can be tested.
func run(name string, enter func() (release func(), err error), fn func() error, restore func(home netns.NsHandle) error) error {
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		home, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			done <- fmt.Errorf("open the current network namespace: %w", err)
			return
		}
		defer home.Close()
		release, err := enter()
		if err != nil {
			// setns and unshare leave the thread where it was when they fail, but an enter of several steps may
			// fail after it moved (netns.New unshares, then opens the new namespace): the thread goes back first.
			err = fmt.Errorf("enter %s: %w", name, err)
			if rerr := restore(home); rerr != nil {
				done <- errors.Join(err, fmt.Errorf("return from %s: %w", name, rerr))
				return
			}
			runtime.UnlockOSThread()
			done <- err
			return
		}
		defer release()
		ferr := fn()
		if err := restore(home); err != nil {
			done <- errors.Join(ferr, fmt.Errorf("return from %s: %w", name, err))
			return
		}
		runtime.UnlockOSThread()
		done <- ferr
	}()
	return <-done
}
