package virtqueue

import (
	"encoding/binary"
	"fmt"
	"sync"

	"golang.org/x/sys/unix"
)

// caller signals the driver through the call eventfd, from a goroutine of its own. The eventfd's file
// description is shared with the front end (QEMU), which can clear O_NONBLOCK on it and fill its counter: a write
// then blocks until someone reads it, which a front end its guest took over need never do. Only the caller's
// goroutine can be held so: signal, set and close never wait for a write, so neither do the device's loops, nor
// its Stop, which waits for them. A held goroutine stays held (one per queue at most) until the process ends.
type caller struct {
	mu      sync.Mutex
	fd      int   // owned, -1 when none
	pending bool  // a signal asked for and not yet written
	busy    bool  // the writing goroutine runs (or is held in a write)
	err     error // the first failure since signal last reported one
}

// signal asks for one write to the eventfd. Signals asked for while one is written coalesce, as the counter's
// increments do for the driver. It reports a failure of an earlier write.
func (c *caller) signal() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	err := c.err
	c.err = nil
	if c.fd < 0 {
		return err
	}
	c.pending = true
	if !c.busy {
		c.busy = true
		go c.write()
	}
	return err
}

// write writes the signals asked for until none is left. Each write goes to a duplicate of the eventfd, so
// that set and close may replace or close it meanwhile.
func (c *caller) write() {
	var one [8]byte
	binary.LittleEndian.PutUint64(one[:], 1)
	for {
		c.mu.Lock()
		if !c.pending || c.fd < 0 {
			c.busy, c.pending = false, false
			c.mu.Unlock()
			return
		}
		c.pending = false
		fd, err := dupCloexec(c.fd)
		if err != nil {
			c.fail(fmt.Errorf("notify driver: duplicate call fd %d: %w", c.fd, err))
			c.busy = false
			c.mu.Unlock()
			return
		}
		c.mu.Unlock()
		// EAGAIN: the counter is full, so the driver has a signal to read already.
		if _, err := unix.Write(fd, one[:]); err != nil && err != unix.EAGAIN {
			c.mu.Lock()
			c.fail(fmt.Errorf("notify driver through call fd: %w", err))
			c.mu.Unlock()
		}
		unix.Close(fd)
	}
}

// fail keeps err for signal to report, unless an earlier failure waits; c.mu is held.
func (c *caller) fail(err error) {
	if c.err == nil {
		c.err = err
	}
}

// set replaces the eventfd with a duplicate of fd (-1: none).
func (c *caller) set(fd int) error {
	nfd := -1
	if fd >= 0 {
		var err error
		if nfd, err = dupCloexec(fd); err != nil {
			return err
		}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.fd >= 0 {
		unix.Close(c.fd)
	}
	c.fd = nfd
	return nil
}

// close releases the eventfd: nothing is written afterwards (but for a write under way).
func (c *caller) close() { _ = c.set(-1) }
