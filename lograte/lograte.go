// Package lograte keeps what an untrusted party can make Kiln log to a few lines per interval: the guest's
// writes into its vsock rings, what a guest makes virtiofsd complain of.
package lograte

import (
	"sync"
	"time"
)

// Limiter lets the first burst events of each interval be logged and counts the rest, so a guest that writes
// garbage into its rings as fast as it can costs a few log lines per interval instead of one per chain.
type Limiter struct {
	burst    int
	interval time.Duration
	now      func() time.Time // time.Now; tests move it by hand

	mu         sync.Mutex
	start      time.Time // of the current interval; zero before the first event
	logged     int       // events let through in the current interval
	suppressed int       // events left out since the last summary
}

// New returns a Limiter of burst events per interval.
func New(burst int, interval time.Duration) *Limiter {
	return &Limiter{burst: burst, interval: interval, now: time.Now}
}

// Allow says whether this event may be logged. When it opens a new interval it also returns how many events
// were left out before it, for the caller to log as one summary line first.
func (l *Limiter) Allow() (ok bool, summary int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if now := l.now(); l.start.IsZero() || now.Sub(l.start) >= l.interval {
		l.start, l.logged = now, 0
		summary, l.suppressed = l.suppressed, 0
	}
	if l.logged < l.burst {
		l.logged++
		return true, summary
	}
	l.suppressed++
	return false, summary
}

// Flush returns the events left out since the last summary and starts counting afresh, so a flood that stops
// is still summed up (the vsock device calls it when it stops).
func (l *Limiter) Flush() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := l.suppressed
	l.suppressed = 0
	return n
}
