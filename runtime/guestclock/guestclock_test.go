package guestclock

import (
	"context"
	"errors"
	"io"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
)

// fakeGuest is a guest whose clock is the host's plus an offset; a step moves the offset, a slew is recorded.
type fakeGuest struct {
	mu      sync.Mutex
	offset  time.Duration
	answer  int64 // the clock it answers with, when fixed
	fixed   bool
	err     error // every call fails with it
	adjusts []*agentv1.ClockRequest
	calls   int
}

func (g *fakeGuest) Clock(_ context.Context, req *agentv1.ClockRequest) (*agentv1.ClockResponse, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.calls++
	if g.err != nil {
		return nil, g.err
	}
	if req.AdjustNanos != 0 {
		g.adjusts = append(g.adjusts, req)
		if req.Step {
			g.offset += time.Duration(req.AdjustNanos)
		}
	}
	if g.fixed {
		return &agentv1.ClockResponse{WallClockUnixNano: g.answer}, nil
	}
	return &agentv1.ClockResponse{WallClockUnixNano: time.Now().Add(g.offset).UnixNano()}, nil
}

func TestDecide(t *testing.T) {
	ms := time.Millisecond
	for _, tc := range []struct {
		name   string
		r      Reading
		adjust time.Duration
		step   bool
	}{
		{"in step", Reading{Offset: 200 * time.Microsecond, RoundTrip: 2 * ms}, 0, false},
		{"within the round trip's uncertainty", Reading{Offset: -4 * ms, RoundTrip: 10 * ms}, 0, false},
		{"a small offset is slewed back", Reading{Offset: 3 * ms, RoundTrip: 2 * ms}, -3 * ms, false},
		{"behind is slewed forward", Reading{Offset: -100 * ms, RoundTrip: 2 * ms}, 100 * ms, false},
		{"from the step threshold on, a step", Reading{Offset: -StepAt, RoundTrip: 2 * ms}, StepAt, true},
		{"an hour ahead", Reading{Offset: time.Hour, RoundTrip: 50 * ms}, -time.Hour, true},
		{"too slow a round trip to act on", Reading{Offset: time.Hour, RoundTrip: 2 * time.Second}, 0, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := Decide(tc.r)
			if c.Adjust != tc.adjust || c.Step != tc.step || c.Reading != tc.r {
				t.Errorf("Decide(%+v) = %+v, want adjust %s step %v", tc.r, c, tc.adjust, tc.step)
			}
		})
	}
}

// Read keeps the reading with the shortest round trip and takes the offset at its midpoint.
func TestReadKeepsTheShortestRoundTrip(t *testing.T) {
	base := time.Now()
	// Host clock readings around each call: round trips of 10, 2 and 6 ms.
	ticks := []time.Duration{0, 10 * time.Millisecond, 20 * time.Millisecond, 22 * time.Millisecond, 30 * time.Millisecond, 36 * time.Millisecond}
	i := 0
	now := func() time.Time { d := ticks[i]; i++; return base.Add(d) }
	// The guest answers 5 s ahead of the midpoint of the second call.
	g := &fakeGuest{answer: base.Add(21*time.Millisecond + 5*time.Second).UnixNano(), fixed: true}
	r, err := Read(context.Background(), g, 3, now)
	if err != nil {
		t.Fatal(err)
	}
	if r.RoundTrip != 2*time.Millisecond || r.Offset != 5*time.Second {
		t.Errorf("reading %+v, want a 2ms round trip and a 5s offset", r)
	}
}

// A guest's answer is checked; a failed call is the error, naming the clock.
func TestReadRefuses(t *testing.T) {
	for _, tc := range []struct {
		name string
		g    *fakeGuest
		want string
	}{
		{"a time before 1970", &fakeGuest{answer: -5, fixed: true}, "not a time after 1970"},
		{"no time (an empty answer)", &fakeGuest{fixed: true}, "not a time after 1970"},
		{"the agent fails", &fakeGuest{err: errors.New("connection closed")}, "connection closed"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := Read(context.Background(), tc.g, Samples, time.Now); err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), "guest's clock") {
				t.Errorf("Read: %v, want an error naming the guest's clock and %q", err, tc.want)
			}
		})
	}
}

// Sync steps a clock an hour off back to the host's, slews one a few milliseconds off, leaves one in step.
func TestSync(t *testing.T) {
	for _, tc := range []struct {
		name   string
		offset time.Duration
		step   bool
		adjust bool
	}{
		{"an hour behind", -time.Hour, true, true},
		{"ten seconds ahead", 10 * time.Second, true, true},
		{"50 ms ahead", 50 * time.Millisecond, false, true},
		{"in step", 0, false, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g := &fakeGuest{offset: tc.offset}
			c, err := Sync(context.Background(), g)
			if err != nil {
				t.Fatal(err)
			}
			if !tc.adjust {
				if len(g.adjusts) != 0 {
					t.Errorf("corrected a clock in step: %v", g.adjusts)
				}
				return
			}
			if len(g.adjusts) != 1 || g.adjusts[0].Step != tc.step || c.Step != tc.step {
				t.Fatalf("corrections %v (%+v), want one, step %v", g.adjusts, c, tc.step)
			}
			// Within the fake's own round trips (microseconds), the correction undoes the offset.
			if d := (time.Duration(g.adjusts[0].AdjustNanos) + tc.offset).Abs(); d > 20*time.Millisecond {
				t.Errorf("adjusted by %s for an offset of %s", time.Duration(g.adjusts[0].AdjustNanos), tc.offset)
			}
			if tc.step && g.offset.Abs() > 20*time.Millisecond {
				t.Errorf("the guest's clock is %s off after the step", g.offset)
			}
		})
	}
}

// Follow corrects the guest's clock at each tick and stops with its context; failures do not stop it.
func TestFollow(t *testing.T) {
	log := logrus.New()
	log.SetOutput(io.Discard)
	g := &fakeGuest{offset: -time.Minute}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		Follow(ctx, g, 10*time.Millisecond, logrus.NewEntry(log))
		close(done)
	}()
	deadline := time.Now().Add(10 * time.Second)
	for {
		g.mu.Lock()
		stepped := len(g.adjusts) > 0
		if stepped {
			g.err = errors.New("agent gone") // the next syncs fail; Follow goes on
		}
		calls := g.calls
		g.mu.Unlock()
		if stepped && calls > 2*Samples+2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after 10 s: %d calls, stepped %v", calls, stepped)
		}
		time.Sleep(5 * time.Millisecond)
	}
	cancel()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Follow did not return once its context ended")
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.offset.Abs() > 20*time.Millisecond {
		t.Errorf("the guest's clock is %s off", g.offset)
	}
}

// An agent without the clock call (an older guest image) ends Follow at once.
func TestFollowEndsWithoutClockCall(t *testing.T) {
	log := logrus.New()
	log.SetOutput(io.Discard)
	g := &fakeGuest{err: status.Error(codes.Unimplemented, "/kiln.agent.v1.Agent/Clock: not implemented")}
	done := make(chan struct{})
	go func() {
		Follow(context.Background(), g, 10*time.Millisecond, logrus.NewEntry(log))
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Follow went on against an agent without the clock call")
	}
	if g.calls != 1 {
		t.Errorf("%d calls, want 1", g.calls)
	}
}
