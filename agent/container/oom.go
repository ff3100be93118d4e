package container

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"

	"golang.org/x/sys/unix"
)

// oomWatcher reports each rise of a cgroup's memory.events oom_kill count.
// The kernel signals changes of cgroup event files as IN_MODIFY.
type oomWatcher struct {
	dir    string
	report func()

	mu       sync.Mutex
	lastKill uint64
	inotify  *os.File
}

// watchOOM starts watching dir; report runs once per rise, from the
// watcher's goroutine or from check.
func watchOOM(dir string, report func()) (*oomWatcher, error) {
	w := &oomWatcher{dir: dir, report: report}
	fd, err := unix.InotifyInit1(unix.IN_NONBLOCK | unix.IN_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("watch %s for OOM kills: inotify: %w", dir, err)
	}
	file := filepath.Join(dir, "memory.events")
	if _, err := unix.InotifyAddWatch(fd, file, unix.IN_MODIFY); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("watch %s for OOM kills: %w", file, err)
	}
	// A non-blocking descriptor goes through Go's poller, so Close ends a
	// pending Read.
	w.inotify = os.NewFile(uintptr(fd), "inotify")
	w.lastKill, _ = w.read()
	go w.loop()
	return w, nil
}

func (w *oomWatcher) loop() {
	buf := make([]byte, 4096)
	for {
		if _, err := w.inotify.Read(buf); err != nil {
			if errors.Is(err, os.ErrClosed) {
				return
			}
			if !errors.Is(err, unix.EINTR) {
				return
			}
		}
		w.check()
	}
}

func (w *oomWatcher) read() (uint64, error) {
	events, err := readKeyed(w.dir, "memory.events")
	if err != nil {
		return 0, err
	}
	return events["oom_kill"], nil
}

// check reports a rise since the last look. The exit path calls it too, so
// that an OOM kill is reported before the exit it caused.
func (w *oomWatcher) check() {
	w.mu.Lock()
	defer w.mu.Unlock()
	n, err := w.read()
	if err != nil || n <= w.lastKill {
		return
	}
	w.lastKill = n
	w.report()
}

func (w *oomWatcher) close() {
	w.inotify.Close()
}
