package agent

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
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
}

// KernelSeeder is the guest kernel's Seeder: /dev/random's RNDADDENTROPY and RNDRESEEDCRNG, and
// clock_settime(CLOCK_REALTIME). Both need CAP_SYS_ADMIN (CAP_SYS_TIME for the clock), which the agent, PID 1,
// has.
type KernelSeeder struct{}

// AddEntropy implements Seeder.
func (KernelSeeder) AddEntropy(b []byte) error {
	f, err := os.OpenFile("/dev/random", os.O_WRONLY, 0)
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

// SetClock implements Seeder.
func (KernelSeeder) SetClock(t time.Time) error {
	ts := unix.NsecToTimespec(t.UnixNano())
	if err := unix.ClockSettime(unix.CLOCK_REALTIME, &ts); err != nil {
		return fmt.Errorf("set the wall clock to %s: %w", t.UTC().Format(time.RFC3339Nano), err)
	}
	return nil
}

// randomReady reports whether the kernel's random number generator is initialised (getrandom(2) would not
// block).
func randomReady() bool {
	var b [1]byte
	_, err := unix.Getrandom(b[:], unix.GRND_NONBLOCK)
	return !errors.Is(err, unix.EAGAIN)
}
