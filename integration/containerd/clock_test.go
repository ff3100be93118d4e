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
// to its own within a few syncs, in a VM booted for the container and in a spare's VM that a later container
// took (whose sync starts once it is adopted), and with "0s" (never) it stays behind, which shows the sync is
// what moved it.
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
			extra := fmt.Sprintf("[hypervisor]\nfast_start = \"template\"\nspare = true\n[agent]\nclock_sync = %q\n", tc.sync)
			if err := WriteKilnConfig(cfg, k.assets, k.d.StateDir(), extra); err != nil {
				t.Fatal(err)
			}
			saved := k.cfg
			k.cfg = cfg
			defer func() { k.cfg = saved }()
			id := "kiln-clock-" + strings.TrimSuffix(tc.sync, "s")
			k.checkGuestClock(t, id, tc.follows)
			if !tc.follows {
				return
			}
			if !WaitSpare(k.d.Address, 3*time.Minute) {
				t.Fatalf("no spare shim became ready for %s", k.d.Address)
			}
			k.checkGuestClock(t, id+"-spare", true)
			if log := k.logSince(t, 0); !strings.Contains(log, "the spare shim's warm VM runs the task\" container="+id+"-spare") {
				t.Errorf("%s-spare did not run in the spare's VM; containerd's log:\n%s", id, k.d.LogTail(40))
			}
		})
	}
}

// checkGuestClock runs privileged container id, sets its guest's clock an hour back and checks that the guest's
// clock is back on the host's within 30 s (follows) or still about an hour back 5 s later.
func (k *kilnEnv) checkGuestClock(t *testing.T, id string, follows bool) {
	t.Helper()
	k.runDetached(t, id, []string{"--privileged"}, "sleep", "1000")
	back := time.Now().Add(-time.Hour).Unix()
	k.ctr(t, "tasks", "exec", "--exec-id", "set", id, "date", "-s", "@"+strconv.FormatInt(back, 10))
	reads := 0
	offset := func() time.Duration {
		reads++
		out := k.ctr(t, "tasks", "exec", "--exec-id", "read"+strconv.Itoa(reads), id, "date", "+%s")
		guest, err := strconv.ParseInt(strings.TrimSpace(out), 10, 64)
		if err != nil {
			t.Fatalf("%s: the guest's date +%%s: %q", id, out)
		}
		return time.Duration(guest-time.Now().Unix()) * time.Second
	}
	if !follows {
		time.Sleep(5 * time.Second)
		if off := offset(); off > -55*time.Minute {
			t.Fatalf("%s: the guest's clock is %s off the host's with clock_sync = 0s: want it still about an hour back, as it was set", id, off)
		}
		return
	}
	deadline := time.Now().Add(30 * time.Second)
	off := offset()
	for off.Abs() > 2*time.Second && time.Now().Before(deadline) {
		time.Sleep(500 * time.Millisecond)
		off = offset()
	}
	if off.Abs() > 2*time.Second {
		t.Fatalf("%s: the guest's clock is %s off the host's 30 s after it was set an hour back", id, off)
	}
}
