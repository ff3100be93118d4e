package sandbox

import (
	"bytes"
	"strings"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
)

// A guest that sends frames on streams no call waits for gets guestNoiseBurst lines a minute of ttrpc's error,
// then one counting the rest; other entries are untouched.
func TestQuietGuestNoise(t *testing.T) {
	var out bytes.Buffer
	l := logrus.New()
	l.SetOutput(&out)
	l.SetFormatter(&logrus.TextFormatter{DisableTimestamp: true})
	QuietGuestNoise(l)
	QuietGuestNoise(l) // a second call does not wrap twice
	now := time.Unix(1000, 0)
	l.Formatter.(*noiseFilter).now = func() time.Time { return now }
	for range 100 {
		l.WithField("stream", 7).Error("ttrpc: received message on inactive stream")
		l.Info("the shim's own line")
	}
	lines := func(s string) int { return strings.Count(out.String(), s) }
	if n := lines("inactive stream"); n != guestNoiseBurst {
		t.Errorf("%d lines of the guest's noise in one interval, want %d", n, guestNoiseBurst)
	}
	if n := lines("the shim's own line"); n != 100 {
		t.Errorf("%d of the shim's own lines, want all 100", n)
	}
	now = now.Add(guestNoiseInterval)
	out.Reset()
	l.Error("ttrpc: received message on inactive stream")
	if !strings.Contains(out.String(), "90 more lines the guest caused were not logged") || lines("inactive stream") != 1 {
		t.Errorf("the next interval's first line:\n%s\nwant the count of what was left out, then the line", out.String())
	}
}
