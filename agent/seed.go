package agent

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Bounds of SeedGuest's entropy: enough to initialise the kernel's generator (256 bits), and no more than one
// request should carry.
const (
	MinSeedEntropy = 32
	MaxSeedEntropy = 512
)

// Seeder is how SeedGuest reaches the kernel.
type Seeder interface {
	// AddEntropy credits b to the kernel's entropy pool and reseeds its random number generator.
	AddEntropy(b []byte) error
	// SetClock sets the wall clock.
	SetClock(t time.Time) error
	// AdjustClock moves the wall clock by d: at once when step is set, slewed in otherwise (see
	// agentv1.ClockRequest).
	AdjustClock(d time.Duration, step bool) error
}

// MaxClockSlew bounds a slew Clock takes: at the kernel's 0.5 ms per second, a second takes over half an hour.
// A larger correction is a step.
const MaxClockSlew = time.Second

// KernelSeeder is the guest kernel's Seeder: /dev/random's RNDADDENTROPY and RNDRESEEDCRNG, and
// clock_settime(CLOCK_REALTIME). Both need CAP_SYS_ADMIN (CAP_SYS_TIME for the clock), which the agent, PID 1,
// has.
type KernelSeeder struct{}

// AddEntropy implements Seeder.
func (KernelSeeder) AddEntropy(b []byte) error {
	f, err := openRandom("/dev/random", os.TempDir(), randomNode)
	if err != nil {
		return fmt.Errorf("add entropy: %w", err)
	}
	defer f.Close()
	// struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }, entropy_count in bits.
	info := make([]byte, 8+len(b))
	binary.NativeEndian.PutUint32(info[0:], uint32(8*len(b)))
	binary.NativeEndian.PutUint32(info[4:], uint32(len(b)))
	copy(info[8:], b)
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), unix.RNDADDENTROPY, uintptr(unsafe.Pointer(&info[0]))); errno != 0 {
		return fmt.Errorf("add entropy: RNDADDENTROPY: %w", errno)
	}
	// Credited entropy initialises a generator that is not yet; one that is only mixes it in at its next
	// reseed, so reseed now (a guest restored from a template must not go on from the template's state).
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), unix.RNDRESEEDCRNG, 0); errno != 0 {
		return fmt.Errorf("add entropy: RNDRESEEDCRNG: %w", errno)
	}
	return nil
}

// openRandom opens the kernel's random device for writing. The host seeds the guest as soon as the agent answers,
// which may be before the guest's late setup has mounted devtmpfs on /dev: then the agent makes a node of its own
// (ownNode: randomNode, in a directory under scratch). The late setup goes on meanwhile, and mounts /tmp, the
// scratch directory, nodev after /dev: a node made there may not open, and then /dev is there, so dev is tried
// again.
func openRandom(dev, scratch string, ownNode func(scratch string) (*os.File, error)) (*os.File, error) {
	f, err := os.OpenFile(dev, os.O_WRONLY, 0)
	if !errors.Is(err, os.ErrNotExist) {
		return f, err
	}
	f, nodeErr := ownNode(scratch)
	if nodeErr == nil {
		return f, nil
	}
	if f, err := os.OpenFile(dev, os.O_WRONLY, 0); err == nil {
		return f, nil
	}
	return nil, fmt.Errorf("%s is not there yet, and %w", dev, nodeErr)
}

// randomNode makes a node of the random device (character device 1:8) in a directory under scratch, opens it
// and removes it again.
func randomNode(scratch string) (*os.File, error) {
	dir, err := os.MkdirTemp(scratch, "kiln-random-")
	if err != nil {
		return nil, fmt.Errorf("no directory for a node of its own: %w", err)
	}
	defer os.RemoveAll(dir)
	node := filepath.Join(dir, "random")
	if err := unix.Mknod(node, unix.S_IFCHR|0o600, int(unix.Mkdev(1, 8))); err != nil {
		return nil, fmt.Errorf("making a node of its own failed: %w", err)
	}
	f, err := os.OpenFile(node, os.O_WRONLY, 0)
	if err != nil {
		return nil, fmt.Errorf("opening a node of its own failed: %w", err)
	}
	return f, nil
}

// SetClock implements Seeder.
func (KernelSeeder) SetClock(t time.Time) error {
	ts := unix.NsecToTimespec(t.UnixNano())
	if err := unix.ClockSettime(unix.CLOCK_REALTIME, &ts); err != nil {
		return fmt.Errorf("set the wall clock to %s: %w", t.UTC().Format(time.RFC3339Nano), err)
	}
	return nil
}

// AdjustClock implements Seeder, with adjtimex(2) (clockAdjustment). A step also ends a slew still under way,
// which the kernel would otherwise go on with, moving the clock off the host's again.
func (KernelSeeder) AdjustClock(d time.Duration, step bool) error {
	how := "slew"
	if step {
		how = "step"
	}
	tx := clockAdjustment(d, step)
	if _, err := unix.Adjtimex(&tx); err != nil {
		return fmt.Errorf("%s the wall clock by %s: %w", how, d, err)
	}
	if step {
		end := clockAdjustment(0, false)
		if _, err := unix.Adjtimex(&end); err != nil {
			return fmt.Errorf("end the slew under way after a step of the wall clock: %w", err)
		}
	}
	return nil
}

// clockAdjustment is the adjtimex(2) request that moves the wall clock by d: ADJ_SETOFFSET for a step, whose
// offset is a timeval of whole seconds and microseconds that are never negative (not ADJ_NANO's nanoseconds,
// which would leave STA_NANO set for every later ntp_adjtime(3) reader), or ADJ_OFFSET_SINGLESHOT (adjtime(3)'s
// slew, in microseconds).
func clockAdjustment(d time.Duration, step bool) unix.Timex {
	var tx unix.Timex
	if !step {
		tx.Modes = unix.ADJ_OFFSET_SINGLESHOT
		tx.Offset = int64(d / time.Microsecond)
		return tx
	}
	sec, usec := int64(d/time.Second), int64(d%time.Second/time.Microsecond)
	if usec < 0 {
		sec, usec = sec-1, usec+int64(time.Second/time.Microsecond)
	}
	tx.Modes = unix.ADJ_SETOFFSET
	tx.Time = unix.Timeval{Sec: sec, Usec: usec}
	return tx
}

// randomReady reports whether the kernel's random number generator is initialised (getrandom(2) would not
// block).
func randomReady() bool {
	var b [1]byte
	_, err := unix.Getrandom(b[:], unix.GRND_NONBLOCK)
	return !errors.Is(err, unix.EAGAIN)
}
