// Package netdump repeats a netlink dump that the kernel marked as interrupted, for the host runtime and the guest
// agent alike.
//
// The kernel answers a dump (every link, address, route or neighbour of a namespace) in several messages, and
// flags them when the table changed in between; github.com/vishvananda/netlink then returns what it read with
// netlink.ErrDumpInterrupted. Tables change under Kiln as a matter of course: a spare's guest binds several
// hot-plugged NICs at once while its agent looks for one of them, and a pod's namespace gains neighbours and IPv6
// addresses while the shim reads it. A fresh dump is consistent unless the table changes again, so the dump is
// simply asked for again, a bounded number of times.
package netdump

import (
	"errors"
	"fmt"
	"time"

	"github.com/vishvananda/netlink"
)

// attempts bounds the dumps of one call: a table that changes during every one of them is being churned by
// something else, and the caller's error says so rather than spinning.
const attempts = 10

// pause is the wait before the second attempt, doubled for each one after, so that a burst of changes (NICs
// binding one after another) can end: at most about 50 ms in all.
const pause = 100 * time.Microsecond

// Consistent returns list's result once a dump was not interrupted. Any other error comes back at once, as it
// is; a dump interrupted every time returns an error that wraps netlink.ErrDumpInterrupted.
func Consistent[T any](list func() (T, error)) (T, error) {
	wait := pause
	for i := 1; ; i++ {
		v, err := list()
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			return v, err
		}
		if i == attempts {
			var zero T
			return zero, fmt.Errorf("the table changed during each of %d dumps: %w", attempts, err)
		}
		time.Sleep(wait)
		wait *= 2
	}
}
