// Command lockguest runs in a container of integration's TestPodContainersShareABoundDirectory: what one container
// does to a shared directory that another must see (a lock, a file created under an inotify watch).
//
//	lockguest hold LOCK STATE       take an exclusive flock on LOCK, write "locked" to STATE, then wait
//	                                for DIR/watching and create DIR/after (DIR is STATE's directory)
//	lockguest try LOCK              print "held" if another holds an exclusive flock on LOCK, else "free"
//	lockguest watch DIR             watch DIR with inotify, create DIR/watching, and print "seen" once
//	                                DIR/after is created there, or "not seen" after 20 s
package main

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "lockguest:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	switch {
	case len(args) == 3 && args[0] == "hold":
		return hold(args[1], args[2])
	case len(args) == 2 && args[0] == "try":
		return try(args[1])
	case len(args) == 2 && args[0] == "watch":
		return watch(args[1])
	}
	return fmt.Errorf("usage: lockguest hold LOCK STATE | try LOCK | watch DIR (got %q)", args)
}

func hold(lock, state string) error {
	f, err := os.OpenFile(lock, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return err
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX); err != nil {
		return fmt.Errorf("flock %s: %w", lock, err)
	}
	if err := os.WriteFile(state, []byte("locked\n"), 0o644); err != nil {
		return err
	}
	dir := filepath.Dir(state)
	for {
		if _, err := os.Stat(filepath.Join(dir, "watching")); err == nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err := os.WriteFile(filepath.Join(dir, "after"), nil, 0o644); err != nil {
		return err
	}
	for {
		time.Sleep(time.Hour) // holds the lock until the container is killed
	}
}

func try(lock string) error {
	f, err := os.Open(lock)
	if err != nil {
		return err
	}
	err = unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
	switch {
	case errors.Is(err, unix.EWOULDBLOCK):
		fmt.Println("held")
	case err == nil:
		fmt.Println("free")
	default:
		return fmt.Errorf("flock %s: %w", lock, err)
	}
	return nil
}

func watch(dir string) error {
	fd, err := unix.InotifyInit1(unix.IN_CLOEXEC | unix.IN_NONBLOCK)
	if err != nil {
		return err
	}
	if _, err := unix.InotifyAddWatch(fd, dir, unix.IN_CREATE|unix.IN_MOVED_TO); err != nil {
		return fmt.Errorf("watch %s: %w", dir, err)
	}
	if err := os.WriteFile(filepath.Join(dir, "watching"), nil, 0o644); err != nil {
		return err
	}
	buf := make([]byte, 4096)
	for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		n, err := unix.Read(fd, buf)
		if errors.Is(err, unix.EAGAIN) {
			continue
		}
		if err != nil {
			return err
		}
		// struct inotify_event: wd, mask, cookie, len, then a name of len bytes, NUL-padded.
		for off := 0; off+unix.SizeofInotifyEvent <= n; {
			nameLen := int(uint32(buf[off+12]) | uint32(buf[off+13])<<8 | uint32(buf[off+14])<<16 | uint32(buf[off+15])<<24)
			end := off + unix.SizeofInotifyEvent + nameLen
			if end > n {
				break
			}
			if name := bytes.TrimRight(buf[off+unix.SizeofInotifyEvent:end], "\x00"); string(name) == "after" {
				fmt.Println("seen")
				return nil
			}
			off = end
		}
	}
	fmt.Println("not seen")
	return nil
}
