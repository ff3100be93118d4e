package lograte

import (
	"testing"
	"time"
)

// TestLimiterLetsABurstThroughPerInterval pins the throttle: the first burst events
// of an interval are logged, the rest counted, and the count is handed back once, when the next interval opens.
func TestLimiterLetsABurstThroughPerInterval(t *testing.T) {
	type event struct {
		at      time.Duration // since the first event
		ok      bool
		summary int
	}
	tests := []struct {
		name   string
		events []event
		flush  int // what flush returns afterwards
	}{
		{"under the burst", []event{{0, true, 0}, {time.Second, true, 0}}, 0},
		{"over the burst", []event{{0, true, 0}, {1, true, 0}, {2, true, 0}, {3, false, 0}, {4, false, 0}}, 2},
		{"next interval reports what was left out", []event{
			{0, true, 0}, {1, true, 0}, {2, true, 0}, {3, false, 0},
			{time.Minute, true, 1}, {time.Minute + 1, true, 0},
		}, 0},
		{"quiet interval in between", []event{
			{0, true, 0}, {1, true, 0}, {2, true, 0}, {3, false, 0}, {4, false, 0},
			{10 * time.Minute, true, 2},
		}, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			base := time.Unix(1000, 0)
			now := base
			l := New(3, time.Minute)
			l.now = func() time.Time { return now }
			for i, e := range tt.events {
				now = base.Add(e.at)
				if ok, summary := l.Allow(); ok != e.ok || summary != e.summary {
					t.Fatalf("event %d at %v: allow = %v, %d; want %v, %d", i, e.at, ok, summary, e.ok, e.summary)
				}
			}
			if n := l.Flush(); n != tt.flush {
				t.Fatalf("flush = %d, want %d", n, tt.flush)
			}
			if n := l.Flush(); n != 0 {
				t.Fatalf("second flush = %d, want 0", n)
			}
		})
	}
}
