package containerd

import (
	"fmt"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestKilnGuestClockFollowsHost: a container under runc reads the host's clock; one in a VM reads the guest's,
// which must follow the host's as well (runtime/guestclock). A privileged container puts the guest's clock an
// hour back, as a host's NTP step or a sleeping host leaves it; with agent.clock_sync the host steps it back
// to its own within a few syncs, and with "0s" (never) it stays behind, which shows the sync is what moved it.
func TestKilnGuestClockFollowsHost(t *testing.T) {
	k := startKiln(t)
	for _, tc := range []struct {
		sync    string
		follows bool
	}{
		{"1s", true},
		{"0s", false},
	} {
		t.Run("clock_sync="+tc.sync, func(t *testing.T) {
			cfg := filepath.Join(t.TempDir(), "kiln.toml")
			if err := WriteKilnConfig(cfg, k.assets, k.d.StateDir(), fmt.Sprintf("[agent]\nclock_sync = %q\n", tc.sync)); err != nil {
				t.Fatal(err)
			}
			saved := k.cfg
			k.cfg = cfg
			defer func() { k.cfg = saved }()
			id := "kiln-clock-" + strings.TrimSuffix(tc.sync, "s")
			k.runDetached(t, id, []string{"--privileged"}, "sleep", "1000")
			back := time.Now().Add(-time.Hour).Unix()
			k.ctr(t, "tasks", "exec", "--exec-id", "set", id, "date", "-s", "@"+strconv.FormatInt(back, 10))
			reads := 0
			offset := func() time.Duration {
				reads++
				out := k.ctr(t, "tasks", "exec", "--exec-id", "read"+strconv.Itoa(reads), id, "date", "+%s")
				guest, err := strconv.ParseInt(strings.TrimSpace(out), 10, 64)
				if err != nil {
					t.Fatalf("the guest's date +%%s: %q", out)
				}
				return time.Duration(guest-time.Now().Unix()) * time.Second
			}
			deadline := time.Now().Add(30 * time.Second)
			off := offset()
			for tc.follows && off.Abs() > 2*time.Second && time.Now().Before(deadline) {
				time.Sleep(500 * time.Millisecond)
				off = offset()
			}
			if tc.follows && off.Abs() > 2*time.Second {
				t.Fatalf("the guest's clock is %s off the host's 30 s after it was set an hour back, with clock_sync = %s", off, tc.sync)
			}
			if !tc.follows {
				time.Sleep(5 * time.Second)
				if off = offset(); off > -55*time.Minute {
					t.Fatalf("the guest's clock is %s off the host's with clock_sync = 0s: want it still about an hour back, as it was set", off)
				}
			}
		})
	}
}
