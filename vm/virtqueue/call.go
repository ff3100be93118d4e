package virtqueue

import (
	"encoding/binary"
	"fmt"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// caller writes the call eventfd, which signals the driver. The eventfd's file description is shared with the
// front end (QEMU), which can clear O_NONBLOCK on it and fill its counter: a write then blocks until someone
// reads, which a front end its guest took over need never do. So each write runs on a goroutine of its own,
// writing to a duplicate it owns, and the caller waits for it heldWrite at most. A healthy front end's eventfd
// never blocks: its writes are done when signal returns, in order with set and close (QEMU checks a call fd it
// replaces for a pending signal; a write landing on it later would be lost). A write still blocked after
// heldWrite is left to its goroutine, and none is made while it is held: its counter is full, so the driver has
// a signal to read. Neither the device's loops nor its Stop wait for a held write.
type caller struct {
	mu   sync.Mutex
	fd   int           // owned, -1 when none
	held chan struct{} // closed when the held write ends; nil when none is held
}

// heldWrite is how long signal waits for a write before leaving it to its goroutine.
const heldWrite = 100 * time.Millisecond

// signal writes 1 to the eventfd, if there is one.
func (c *caller) signal() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.fd < 0 || c.heldLocked() {
		return nil
	}
	name := c.fd
	fd, err := dupCloexec(c.fd)
	if err != nil {
		return fmt.Errorf("notify driver: duplicate call fd %d: %w", name, err)
	}
	done := make(chan struct{})
	var werr error
	go func() {
		defer close(done)
		defer unix.Close(fd)
		var one [8]byte
		binary.LittleEndian.PutUint64(one[:], 1)
		// EAGAIN: the counter is full, so the driver has a signal to read already.
		if _, err := unix.Write(fd, one[:]); err != nil && err != unix.EAGAIN {
			werr = fmt.Errorf("notify driver through call fd %d: %w", name, err)
		}
	}()
	t := time.NewTimer(heldWrite)
	defer t.Stop()
	select {
	case <-done:
		return werr
	case <-t.C:
		c.held = done
		return nil
	}
}

// isHeld says whether a write to the call eventfd is held (the front end filled a blocking eventfd's counter).
func (c *caller) isHeld() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.heldLocked()
}

func (c *caller) heldLocked() bool {
	if c.held == nil {
		return false
	}
	select {
	case <-c.held:
		c.held = nil
		return false
	default:
		return true
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

// close releases the eventfd: nothing is written afterwards.
func (c *caller) close() { _ = c.set(-1) }
