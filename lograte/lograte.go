package vsock

import (
	"sync"
	"time"
)

// logLimiter lets the first burst events of each interval be logged and counts the rest, so a guest that writes
// garbage into its rings as fast as it can costs a few log lines per interval instead of one per chain.
type logLimiter struct {
	burst    int
	interval time.Duration
	now      func() time.Time // time.Now; tests move it by hand

	mu         sync.Mutex
	start      time.Time // of the current interval; zero before the first event
	logged     int       // events let through in the current interval
	suppressed int       // events left out since the last summary
}

func newLogLimiter(burst int, interval time.Duration) *logLimiter {
	return &logLimiter{burst: burst, interval: interval, now: time.Now}
}

// allow says whether this event may be logged. When it opens a new interval it also returns how many events
// were left out before it, for the caller to log as one summary line first.
func (l *logLimiter) allow() (ok bool, summary int) {
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

// flush returns the events left out since the last summary and starts counting afresh, so a flood that stops
// is still summed up (the device calls it when it stops).
func (l *logLimiter) flush() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := l.suppressed
	l.suppressed = 0
	return n
}
