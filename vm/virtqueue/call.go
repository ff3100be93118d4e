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
// replaces for a pending signal; a write landing on it later would be lost). A write not done after heldWrite is
// left to its goroutine, and no other is made while it is held; a signal asked for meanwhile is owed, and written
// once the held write ends. A write is held not only by a full counter: on a loaded host its goroutine can wait
// that long for a CPU, its write done or not, and the driver may have taken that signal and asked for the next
// one. Dropped, that one was lost for good with VIRTIO_RING_F_EVENT_IDX (the driver's used_event fell behind
// every later Notify's range): the guest saw nothing more on the queue until another queue's interrupt, tens of
// seconds on an idle connection. Neither the device's loops nor its Stop wait for a held write.
type caller struct {
	mu   sync.Mutex
	fd   int           // owned, -1 when none
	held chan struct{} // closed when the held write ends; nil when none is held
	// owed says a signal was asked for while a write was held: it is written when that write ends (paid).
	owed bool
	// afterWrite, when set (tests), runs in a write's goroutine after its write: a goroutine kept from its CPU.
	afterWrite func()
}

// heldWrite is how long signal waits for a write before leaving it to its goroutine.
const heldWrite = 100 * time.Millisecond

// signal writes 1 to the eventfd, if there is one.
func (c *caller) signal() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.signalLocked()
}

func (c *caller) signalLocked() error {
	if c.fd < 0 {
		return nil
	}
	if c.heldLocked() {
		c.owed = true
		return nil
	}
	c.owed = false // this write is the signal owed
	name := c.fd
	fd, err := dupCloexec(c.fd)
	if err != nil {
		return fmt.Errorf("notify driver: duplicate call fd %d: %w", name, err)
	}
	done := make(chan struct{})
	var werr error
	afterWrite := c.afterWrite
	go func() {
		defer c.paid(done)
		defer close(done)
		defer unix.Close(fd)
		var one [8]byte
		binary.LittleEndian.PutUint64(one[:], 1)
		// EAGAIN: the counter is full, so the driver has a signal to read already.
		if _, err := unix.Write(fd, one[:]); err != nil && err != unix.EAGAIN {
			werr = fmt.Errorf("notify driver through call fd %d: %w", name, err)
		}
		if afterWrite != nil {
			afterWrite()
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

// paid writes the signal owed since the write done ended was held, once it has (to the eventfd of now: one set
// meanwhile is the one the front end reads).
func (c *caller) paid(done chan struct{}) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.held != done {
		return // not held (signal waited for it), or already seen to end
	}
	c.held = nil
	if c.owed {
		c.owed = false
		_ = c.signalLocked() // an error here has no one to go to; the next Notify reports its own
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
		return false // ended; paid clears it
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
