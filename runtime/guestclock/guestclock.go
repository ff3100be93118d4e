// Package guestclock keeps a guest's wall clock on the host's. A container under runc reads the host's clock;
// one in a VM reads the guest kernel's, which the host sets at boot (agentv1.SeedGuestRequest) and which then
// runs on its own: it does not follow the host's clock when that is stepped (NTP's first sync after a host's
// boot, an operator's `date -s`), it falls behind by the time the VM stands still (QEMU stopped, the host
// asleep), and it drifts from a host clock that NTP disciplines. Follow reads the guest's clock at an interval,
// as NTP reads a server's (the reading whose round trip was shortest is kept, and the offset is taken from its
// midpoint), and corrects it through the agent: a step for a large offset, a slew for a small one.
package guestclock

import (
	"context"
	"fmt"
	"time"

	"github.com/sirupsen/logrus"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
)

// Agent is the agent's clock call (agentv1.AgentService).
type Agent interface {
	Clock(ctx context.Context, req *agentv1.ClockRequest) (*agentv1.ClockResponse, error)
}

const (
	// StepAt is the offset from which the guest's clock is stepped rather than slewed: NTP's step threshold
	// (ntpd's 128 ms). A slew runs at 0.5 ms per second, so 128 ms take over four minutes; a host clock that
	// was stepped, or a VM that stood still, is followed at once, as a container under runc follows the host.
	StepAt = 128 * time.Millisecond
	// Samples is how many readings a sync takes; the one with the shortest round trip is used.
	Samples = 4
	// minOffset is the least offset corrected, whatever a round trip's uncertainty: below it a slew would
	// chase the noise of the readings.
	minOffset = time.Millisecond
	// maxRoundTrip is the longest round trip whose reading is used: a guest that slow to answer (a host
	// under heavy load) gives an offset too uncertain to act on, and the next sync tries again.
	maxRoundTrip = time.Second
)

// Reading is one comparison of the guest's clock with the host's.
type Reading struct {
	// Offset is how far the guest's clock is ahead of the host's (negative: behind), at the midpoint of the
	// round trip.
	Offset time.Duration
	// RoundTrip is how long the reading took; the offset is known to within half of it.
	RoundTrip time.Duration
}

// Read compares the guest's clock with the host's samples times and returns the reading with the shortest round
// trip. now is the host's clock (time.Now outside tests); it must carry a monotonic reading, as time.Now's does,
// for the round trip.
func Read(ctx context.Context, a Agent, samples int, now func() time.Time) (Reading, error) {
	var best Reading
	for i := range samples {
		sent := now()
		resp, err := a.Clock(ctx, &agentv1.ClockRequest{})
		if err != nil {
			return Reading{}, fmt.Errorf("read the guest's clock: %w", err)
		}
		back := now()
		guest := resp.GetWallClockUnixNano()
		if guest <= 0 {
			return Reading{}, fmt.Errorf("read the guest's clock: the agent answered %d, not a time after 1970", guest)
		}
		rtt := back.Sub(sent)
		mid := sent.UnixNano() + int64(rtt/2)
		r := Reading{Offset: time.Duration(guest - mid), RoundTrip: rtt}
		if i == 0 || r.RoundTrip < best.RoundTrip {
			best = r
		}
	}
	return best, nil
}

// Correction is what a sync did to the guest's clock.
type Correction struct {
	Reading
	// Adjust is how far the guest's clock was moved: 0 when it was close enough, or the reading too uncertain.
	Adjust time.Duration
	// Step says Adjust was a step; a slew otherwise.
	Step bool
}

// Decide turns a reading into a correction: none within the reading's uncertainty (half its round trip, at
// least minOffset) or when the round trip is over maxRoundTrip, a step from StepAt on, a slew below.
func Decide(r Reading) Correction {
	c := Correction{Reading: r}
	off := r.Offset.Abs()
	if r.RoundTrip > maxRoundTrip || off <= max(r.RoundTrip/2, minOffset) {
		return c
	}
	c.Adjust, c.Step = -r.Offset, off >= StepAt
	return c
}

// Sync reads the guest's clock and corrects it (Read, Decide).
func Sync(ctx context.Context, a Agent) (Correction, error) {
	r, err := Read(ctx, a, Samples, time.Now)
	if err != nil {
		return Correction{}, err
	}
	c := Decide(r)
	if c.Adjust == 0 {
		return c, nil
	}
	if _, err := a.Clock(ctx, &agentv1.ClockRequest{AdjustNanos: int64(c.Adjust), Step: c.Step}); err != nil {
		return c, fmt.Errorf("correct the guest's clock by %s: %w", c.Adjust, err)
	}
	return c, nil
}

// Follow syncs the guest's clock every interval until ctx ends, or at once when the agent has no clock call.
// Steps are logged at info, slews at debug; a failed sync is logged as a warning when the one before it
// succeeded, at debug otherwise, so that a guest that stopped answering (which the pod reports) does not fill
// the log.
func Follow(ctx context.Context, a Agent, interval time.Duration, log *logrus.Entry) {
	t := time.NewTicker(interval)
	defer t.Stop()
	failing := false
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		c, err := Sync(ctx, a)
		switch {
		case err != nil && ctx.Err() != nil:
			return
		case status.Code(err) == codes.Unimplemented:
			log.WithError(err).Warn("the guest's agent cannot set its clock (a guest image older than the shim): the guest's clock is set at boot only")
			return
		case err != nil:
			l := log.WithError(err)
			if failing {
				l.Debug("guest clock sync failed again")
			} else {
				l.Warn("guest clock sync failed; the guest's clock may drift from the host's until a sync succeeds")
			}
			failing = true
			continue
		}
		failing = false
		if c.Adjust == 0 {
			continue
		}
		l := log.WithFields(logrus.Fields{"offset": c.Offset, "round_trip": c.RoundTrip})
		if c.Step {
			l.Info("stepped the guest's clock to the host's")
		} else {
			l.Debug("slewing the guest's clock to the host's")
		}
	}
}
