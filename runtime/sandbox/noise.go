package sandbox

import (
	"fmt"
	"sync"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/kiln-runtime/kiln/runtime/container"
)

// guestNoise are messages a guest can make the shim log as often as it likes, and so write the shim's (and
// containerd's) log at its own rate: the two that ttrpc's client logs at error level for each frame on a stream
// no call waits for or that a stream cannot take (the client logs through the process's logger, which is all the
// shim can set), and the events stream's break (runtime/container), which the agent can cause every 100 ms.
var guestNoise = map[string]bool{
	"ttrpc: received message on inactive stream": true,
	"ttrpc: failed to handle message":            true,
	container.EventsStreamBroke:                  true,
}

// Bounds on guestNoise: each message is logged at most guestNoiseBurst times per guestNoiseInterval; a line
// then counts what was left out.
const (
	guestNoiseBurst    = 10
	guestNoiseInterval = time.Minute
)

// QuietGuestNoise bounds how often l logs each of the guest-driven messages (guestNoise) by wrapping its
// formatter; every other entry is formatted as before. Call it once l's formatter is set (containerd's shim sets
// its own when it starts).
func QuietGuestNoise(l *logrus.Logger) {
	if _, done := l.Formatter.(*noiseFilter); done {
		return
	}
	l.SetFormatter(&noiseFilter{inner: l.Formatter, now: time.Now})
}

// noiseFilter formats an entry of guestNoise only while its message is within its bound; past it, the entry
// formats to nothing, which logrus writes as nothing.
type noiseFilter struct {
	inner logrus.Formatter
	now   func() time.Time

	mu      sync.Mutex
	opened  time.Time      // when the current interval began
	counts  map[string]int // entries of each message in the current interval
	dropped int            // entries left out in the current interval
}

func (f *noiseFilter) Format(e *logrus.Entry) ([]byte, error) {
	if !guestNoise[e.Message] {
		return f.inner.Format(e)
	}
	f.mu.Lock()
	now := f.now()
	var summary int
	if f.counts == nil || now.Sub(f.opened) >= guestNoiseInterval {
		summary = f.dropped
		f.opened, f.counts, f.dropped = now, map[string]int{}, 0
	}
	f.counts[e.Message]++
	keep := f.counts[e.Message] <= guestNoiseBurst
	if !keep {
		f.dropped++
	}
	f.mu.Unlock()
	var out []byte
	if summary > 0 {
		s := e.Dup()
		s.Level, s.Message, s.Data = logrus.WarnLevel, fmt.Sprintf("%d more lines the guest caused were not logged", summary), logrus.Fields{}
		b, err := f.inner.Format(s)
		if err != nil {
			return nil, err
		}
		out = append(out, b...)
	}
	if keep {
		b, err := f.inner.Format(e)
		if err != nil {
			return nil, err
		}
		out = append(out, b...)
	}
	return out, nil
}
