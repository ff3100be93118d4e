// Package virtqueue owns the device side of a split virtqueue (VIRTIO 1.2 §2.7) living in guest memory:
// popping descriptor chains from the available ring, publishing used elements, deciding whether the driver
// wants an interrupt, and turning the driver's kicks (an eventfd) into a channel.
//
// It must not know about vhost-user messages or about any device's payload format: a device only sees chains
// of byte slices.
package virtqueue

import (
	"encoding/binary"
	"fmt"
	"os"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"github.com/kiln-runtime/kiln/vm/guestmem"
)

// MaxSize is the largest queue size a split virtqueue may have.
const MaxSize = 32768

// Ring layout constants (VIRTIO 1.2 §2.7).
const (
	descSize      = 16
	usedElemSize  = 8
	ringHeaderLen = 4 // flags + idx

	descFNext     = 1
	descFWrite    = 2
	descFIndirect = 4

	availFNoInterrupt = 1
)

// Config says where a queue lives and how it was negotiated.
type Config struct {
	// Size is the number of descriptors (VHOST_USER_SET_VRING_NUM); a power of two up to MaxSize.
	Size uint16
	// DescAddr, AvailAddr and UsedAddr are guest physical addresses of the three ring parts.
	DescAddr  uint64
	AvailAddr uint64
	UsedAddr  uint64
	// EventIdx is whether VIRTIO_RING_F_EVENT_IDX was negotiated.
	EventIdx bool
	// LastAvail is the next available-ring index to consume (VHOST_USER_SET_VRING_BASE).
	LastAvail uint16
	// KickFD is the eventfd the driver signals when it makes buffers available, or -1. New duplicates it.
	KickFD int
	// CallFD is the eventfd Notify signals, or -1. New duplicates it.
	CallFD int
}

// Queue is the device side of one split virtqueue.
//
// Pop, Push, Notify and LastAvail are called from one goroutine at a time (the device serialises per queue);
// Kicks, SetCallFD, Stop and Close may be called from any goroutine.
type Queue struct {
	mem      *guestmem.Memory
	size     uint16
	eventIdx bool

	desc  []byte // descriptor table
	avail []byte // flags, idx, ring[size], used_event
	used  []byte // flags, idx, ring[size], avail_event

	lastAvail  uint16 // next available-ring index to consume
	nextUsed   uint16 // next used-ring index to fill
	signalUsed uint16 // used index when the driver was last considered for notification

	// barrier is only ever touched by atomic read-modify-write operations, which order this process's
	// accesses to guest memory against the driver's (full fence on amd64 and arm64).
	barrier atomic.Uint32

	call caller

	kicks    chan struct{}
	kickFile *os.File // nil when no kick fd
	stopOnce sync.Once
	readerWG sync.WaitGroup
}

// New validates the ring layout against mem and starts reading the kick eventfd. The queue keeps referring to
// mem, which must stay mapped until the queue is no longer used.
func New(mem *guestmem.Memory, cfg Config) (*Queue, error) {
	if cfg.Size == 0 || cfg.Size > MaxSize || cfg.Size&(cfg.Size-1) != 0 {
		return nil, fmt.Errorf("create virtqueue: size %d is not a power of two up to %d", cfg.Size, MaxSize)
	}
	// VIRTIO 1.2 §2.7: descriptor table 16-byte, available ring 2-byte and used ring 4-byte aligned.
	if cfg.DescAddr%16 != 0 || cfg.AvailAddr%2 != 0 || cfg.UsedAddr%4 != 0 {
		return nil, fmt.Errorf("create virtqueue: misaligned ring (desc %#x avail %#x used %#x)",
			cfg.DescAddr, cfg.AvailAddr, cfg.UsedAddr)
	}
	n := uint64(cfg.Size)
	q := &Queue{mem: mem, size: cfg.Size, eventIdx: cfg.EventIdx, lastAvail: cfg.LastAvail, call: caller{fd: -1},
		kicks: make(chan struct{}, 1)}
	var err error
	if q.desc, err = mem.Slice(cfg.DescAddr, descSize*n); err != nil {
		return nil, fmt.Errorf("create virtqueue: descriptor table: %w", err)
	}
	if q.avail, err = mem.Slice(cfg.AvailAddr, ringHeaderLen+2*n+2); err != nil {
		return nil, fmt.Errorf("create virtqueue: available ring: %w", err)
	}
	if q.used, err = mem.Slice(cfg.UsedAddr, ringHeaderLen+usedElemSize*n+2); err != nil {
		return nil, fmt.Errorf("create virtqueue: used ring: %w", err)
	}
	// The used index in guest memory is the truth after a restart; the driver zeroes it on setup.
	q.nextUsed = binary.LittleEndian.Uint16(q.used[2:])
	q.signalUsed = q.nextUsed

	if err := q.call.set(cfg.CallFD); err != nil {
		return nil, fmt.Errorf("create virtqueue: duplicate call fd %d: %w", cfg.CallFD, err)
	}
	// The first value lets the device look at buffers made available before the queue started.
	q.kicks <- struct{}{}
	if cfg.KickFD >= 0 {
		if err := q.startKickReader(cfg.KickFD); err != nil {
			q.call.close()
			return nil, fmt.Errorf("create virtqueue: kick fd %d: %w", cfg.KickFD, err)
		}
	}
	return q, nil
}

func dupCloexec(fd int) (int, error) {
	return unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
}

// startKickReader reads the kick eventfd through the Go poller, so that closing the file in Stop unblocks
// the reader instead of leaving a thread stuck in read(2). Its reads never wait (readKick): the front end
// shares the eventfd's file description, and can make it blocking again after the queue started.
func (q *Queue) startKickReader(kickFD int) error {
	fd, err := dupCloexec(kickFD)
	if err != nil {
		return fmt.Errorf("duplicate: %w", err)
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return fmt.Errorf("set nonblocking: %w", err)
	}
	q.kickFile = os.NewFile(uintptr(fd), "virtqueue-kick")
	q.readerWG.Add(1)
	go q.readKicks(q.kickFile)
	return nil
}

func (q *Queue) readKicks(f *os.File) {
	defer q.readerWG.Done()
	rc, err := f.SyscallConn()
	if err != nil {
		return
	}
	for {
		var readErr error
		// The callback runs again each time the poller finds the eventfd readable, until it returns true.
		err := rc.Read(func(fd uintptr) bool {
			readErr = readKick(int(fd))
			return readErr != unix.EAGAIN
		})
		if err != nil || readErr != nil {
			// Closed by Stop, or the eventfd broke: either way no more kicks can arrive.
			return
		}
		select {
		case q.kicks <- struct{}{}:
		default: // a kick is already pending; the device drains the whole ring per kick
		}
	}
}

// readKick reads the kick eventfd's counter without waiting, whether or not the file is non-blocking: EAGAIN when
// no kick is pending. A file that takes no RWF_NOWAIT (kernels before 5.12's eventfd) is read as it is.
func readKick(fd int) error {
	var buf [8]byte
	for {
		_, err := unix.Preadv2(fd, [][]byte{buf[:]}, -1, unix.RWF_NOWAIT)
		if err == unix.EOPNOTSUPP {
			_, err = unix.Read(fd, buf[:])
		}
		if err != unix.EINTR {
			return err
		}
	}
}

// Kicks returns a channel that receives a value each time the driver kicks (kick eventfd readable); it is
// closed when the queue is stopped. Reading the eventfd happens inside the queue. Kicks are coalesced, and one
// value is pending from the start so buffers made available before the queue started are not missed.
func (q *Queue) Kicks() <-chan struct{} { return q.kicks }

// Stop stops reading kicks and closes the Kicks channel. Pop, Push and Notify keep working as long as guest
// memory stays mapped, so a device may finish what it was doing. Stop is idempotent.
func (q *Queue) Stop() {
	q.stopOnce.Do(func() {
		if q.kickFile != nil {
			q.kickFile.Close()
		}
		q.readerWG.Wait()
		close(q.kicks)
	})
}

// Close stops the queue and releases its call eventfd; Notify does nothing afterwards. Call it once the device
// no longer uses the queue.
func (q *Queue) Close() {
	q.Stop()
	q.call.close()
}

// SetCallFD replaces the eventfd Notify signals (the frontend may send VHOST_USER_SET_VRING_CALL while the
// queue runs). fd is duplicated; -1 removes it.
func (q *Queue) SetCallFD(fd int) error {
	if err := q.call.set(fd); err != nil {
		return fmt.Errorf("set virtqueue call fd %d: %w", fd, err)
	}
	return nil
}

// Held says whether a write to the call eventfd is still held: the front end filled the counter of a call
// eventfd it made blocking, and has not read it. A healthy front end never does.
func (q *Queue) Held() bool { return q.call.isHeld() }

// Size is the number of descriptors in the queue.
func (q *Queue) Size() uint16 { return q.size }

// LastAvail is the next available-ring index the device will consume (the answer to VHOST_USER_GET_VRING_BASE).
func (q *Queue) LastAvail() uint16 { return q.lastAvail }

// fence orders this process's accesses to guest memory: a locked read-modify-write is a full barrier.
func (q *Queue) fence() { q.barrier.Add(1) }

// Push puts a used element (head, bytes written into Writable) on the used ring. Does not notify.
func (q *Queue) Push(head uint16, written uint32) error {
	if head >= q.size {
		return fmt.Errorf("push used element: head %d out of range (queue size %d)", head, q.size)
	}
	elem := q.used[ringHeaderLen+usedElemSize*int(q.nextUsed%q.size):]
	binary.LittleEndian.PutUint32(elem[0:], uint32(head))
	binary.LittleEndian.PutUint32(elem[4:], written)
	// The element must be visible before the index that publishes it.
	q.fence()
	q.nextUsed++
	binary.LittleEndian.PutUint16(q.used[2:], q.nextUsed)
	return nil
}

// Notify signals the driver (call eventfd) if it asked for it (honours VIRTQ_AVAIL_F_NO_INTERRUPT, and
// used_event when VIRTIO_RING_F_EVENT_IDX was negotiated). It does nothing when nothing was pushed since the
// last Notify. A write that is not done within 100 ms (a front end that filled a blocking call eventfd, or a
// goroutine kept from its CPU) is left to finish on its own (caller): what is signalled meanwhile is written once
// after it.
func (q *Queue) Notify() error {
	// The used index written by Push must be visible before reading the driver's suppression fields, or both
	// sides could decide the other will act and an interrupt would be lost.
	q.fence()
	old, now := q.signalUsed, q.nextUsed
	if old == now {
		return nil
	}
	q.signalUsed = now
	if !q.needNotify(old, now) {
		return nil
	}
	return q.call.signal()
}

// needNotify applies the driver's interrupt suppression to the used entries [old, now).
func (q *Queue) needNotify(old, now uint16) bool {
	if !q.eventIdx {
		return binary.LittleEndian.Uint16(q.avail[0:])&availFNoInterrupt == 0
	}
	usedEvent := binary.LittleEndian.Uint16(q.avail[ringHeaderLen+2*int(q.size):])
	// VIRTIO 1.2 §2.7.10: notify when used_event lies in [old, now), modulo 2^16.
	return now-usedEvent-1 < now-old
}
