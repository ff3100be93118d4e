package integration

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
	"github.com/kiln-runtime/kiln/runtime/guestclock"
)

// The guest's wall clock falls behind the host's while its VM stands still (QMP stop, as while the host sleeps),
// and guestclock.Sync steps it back; the guest kernel takes a step back by a second and a half (whole seconds
// and microseconds to adjtimex) and a slew, as the agent asks for them.
func TestGuestClock(t *testing.T) {
	share := requireVM(t)
	m := testMachine(t, filepath.Join(share, "vmlinuz"), filepath.Join(share, "initrd.img"), nil)
	sb := startSandbox(t, m, 60*time.Second)
	ctx := context.Background()
	read := func(what string) guestclock.Reading {
		t.Helper()
		r, err := guestclock.Read(ctx, sb.Agent(), guestclock.Samples, time.Now)
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		t.Logf("%s: the guest's clock is %s off the host's (round trip %s)", what, r.Offset, r.RoundTrip)
		return r
	}
	// Seeded at start.
	if r := read("at start"); r.Offset.Abs() > 500*time.Millisecond {
		t.Errorf("the guest's clock is %s off the host's after the seed", r.Offset)
	}

	if err := m.Pause(ctx); err != nil {
		t.Fatal(err)
	}
	time.Sleep(3 * time.Second)
	if err := m.Resume(ctx); err != nil {
		t.Fatal(err)
	}
	if r := read("after the VM stood still 3 s"); r.Offset > -2*time.Second {
		t.Fatalf("the guest's clock is %s off the host's after its VM stood still for 3 s: want it about 3 s behind", r.Offset)
	}
	c, err := guestclock.Sync(ctx, sb.Agent())
	if err != nil {
		t.Fatal(err)
	}
	if !c.Step || c.Adjust < 2*time.Second {
		t.Errorf("sync after the VM stood still: %+v, want a step forward of about 3 s", c)
	}
	if r := read("after the sync"); r.Offset.Abs() > max(r.RoundTrip, 50*time.Millisecond) {
		t.Errorf("the guest's clock is %s off the host's after the sync", r.Offset)
	}

	// A step back by a second and a half: a negative offset of whole seconds and nanoseconds to the kernel.
	if _, err := sb.Agent().Clock(ctx, &agentv1.ClockRequest{AdjustNanos: int64(-1500 * time.Millisecond), Step: true}); err != nil {
		t.Fatal(err)
	}
	if r := read("after a step of -1.5 s"); (r.Offset + 1500*time.Millisecond).Abs() > 100*time.Millisecond {
		t.Errorf("the guest's clock is %s off the host's after a step of -1.5 s", r.Offset)
	}
	if c, err := guestclock.Sync(ctx, sb.Agent()); err != nil || !c.Step {
		t.Fatalf("sync after a step of -1.5 s: %+v, %v", c, err)
	}

	// A slew moves the clock by 0.5 ms a second: no jump.
	if _, err := sb.Agent().Clock(ctx, &agentv1.ClockRequest{AdjustNanos: int64(200 * time.Millisecond)}); err != nil {
		t.Fatalf("slew: %v", err)
	}
	if r := read("just after a slew of 200 ms"); r.Offset.Abs() > 100*time.Millisecond {
		t.Errorf("the guest's clock is %s off the host's just after a slew of 200 ms was asked for: a jump", r.Offset)
	}
	if _, err := sb.Agent().Clock(ctx, &agentv1.ClockRequest{AdjustNanos: int64(2 * time.Second)}); err == nil {
		t.Error("the agent took a slew of 2 s")
	}
}
