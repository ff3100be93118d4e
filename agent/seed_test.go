package agent

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
)

type fakeSeeder struct {
	entropy [][]byte
	clocks  []time.Time
	adjusts []clockAdjust
	err     error
}

type clockAdjust struct {
	d    time.Duration
	step bool
}

func (f *fakeSeeder) AdjustClock(d time.Duration, step bool) error {
	f.adjusts = append(f.adjusts, clockAdjust{d, step})
	return f.err
}

func (f *fakeSeeder) AddEntropy(b []byte) error {
	f.entropy = append(f.entropy, bytes.Clone(b))
	return f.err
}

func (f *fakeSeeder) SetClock(t time.Time) error {
	f.clocks = append(f.clocks, t)
	return f.err
}

func TestSeedGuest(t *testing.T) {
	clock := time.Date(2026, 12, 2, 8, 0, 0, 123, time.UTC)
	cases := []struct {
		name        string
		req         *agentv1.SeedGuestRequest
		seederErr   error
		noSeeder    bool
		wantCode    codes.Code
		wantEntropy bool
		wantClock   bool
	}{
		{"entropy and clock", &agentv1.SeedGuestRequest{Entropy: make([]byte, 64), WallClockUnixNano: clock.UnixNano()}, nil, false, codes.OK, true, true},
		{"entropy alone leaves the clock", &agentv1.SeedGuestRequest{Entropy: make([]byte, MinSeedEntropy)}, nil, false, codes.OK, true, false},
		{"too little entropy", &agentv1.SeedGuestRequest{Entropy: make([]byte, MinSeedEntropy-1)}, nil, false, codes.InvalidArgument, false, false},
		{"too much entropy", &agentv1.SeedGuestRequest{Entropy: make([]byte, MaxSeedEntropy+1)}, nil, false, codes.InvalidArgument, false, false},
		{"a clock before 1970", &agentv1.SeedGuestRequest{Entropy: make([]byte, 64), WallClockUnixNano: -1}, nil, false, codes.InvalidArgument, false, false},
		{"the kernel refuses", &agentv1.SeedGuestRequest{Entropy: make([]byte, 64)}, errors.New("EPERM"), false, codes.Unknown, true, false},
		{"no seeder", &agentv1.SeedGuestRequest{Entropy: make([]byte, 64)}, nil, true, codes.Unimplemented, false, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			f := &fakeSeeder{err: tc.seederErr}
			srv := &Server{}
			if !tc.noSeeder {
				srv.cfg.Seeder = f
			}
			_, err := agentService{srv}.SeedGuest(context.Background(), tc.req)
			if got := status.Code(err); got != tc.wantCode {
				t.Fatalf("SeedGuest: %v (code %s), want code %s", err, got, tc.wantCode)
			}
			if got := len(f.entropy) == 1 && bytes.Equal(f.entropy[0], tc.req.Entropy); got != tc.wantEntropy {
				t.Errorf("entropy given to the kernel: %v, want %v", got, tc.wantEntropy)
			}
			if got := len(f.clocks) == 1 && f.clocks[0].Equal(clock); got != tc.wantClock {
				t.Errorf("clock set to %v, want set to %v: %v", f.clocks, clock, tc.wantClock)
			}
		})
	}
}

// Clock passes a correction to the kernel within its bounds, refuses one outside them by name, and answers with
// the clock.
func TestClock(t *testing.T) {
	for _, tc := range []struct {
		name      string
		req       *agentv1.ClockRequest
		seederErr error
		noSeeder  bool
		wantCode  codes.Code
		want      []clockAdjust
	}{
		{"a reading", &agentv1.ClockRequest{}, nil, false, codes.OK, nil},
		{"a slew", &agentv1.ClockRequest{AdjustNanos: int64(-3 * time.Millisecond)}, nil, false, codes.OK, []clockAdjust{{-3 * time.Millisecond, false}}},
		{"the largest slew", &agentv1.ClockRequest{AdjustNanos: int64(MaxClockSlew)}, nil, false, codes.OK, []clockAdjust{{MaxClockSlew, false}}},
		{"a slew too large", &agentv1.ClockRequest{AdjustNanos: int64(-MaxClockSlew - 1)}, nil, false, codes.InvalidArgument, nil},
		{"a step", &agentv1.ClockRequest{AdjustNanos: int64(-time.Hour), Step: true}, nil, false, codes.OK, []clockAdjust{{-time.Hour, true}}},
		{"a step before 1970", &agentv1.ClockRequest{AdjustNanos: -time.Now().UnixNano() - int64(time.Hour), Step: true}, nil, false, codes.InvalidArgument, nil},
		{"the kernel refuses", &agentv1.ClockRequest{AdjustNanos: 1000, Step: true}, errors.New("EPERM"), false, codes.Internal, []clockAdjust{{time.Microsecond, true}}},
		{"no seeder", &agentv1.ClockRequest{}, nil, true, codes.Unimplemented, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := &fakeSeeder{err: tc.seederErr}
			srv := &Server{}
			if !tc.noSeeder {
				srv.cfg.Seeder = f
			}
			before := time.Now()
			resp, err := agentService{srv}.Clock(context.Background(), tc.req)
			if got := status.Code(err); got != tc.wantCode {
				t.Fatalf("Clock: %v (code %s), want code %s", err, got, tc.wantCode)
			}
			if !slices.Equal(f.adjusts, tc.want) {
				t.Errorf("corrections given to the kernel %v, want %v", f.adjusts, tc.want)
			}
			if err == nil {
				if c := time.Unix(0, resp.WallClockUnixNano); c.Before(before) || c.After(time.Now()) {
					t.Errorf("wall clock %v, want between %v and now", c, before)
				}
			}
		})
	}
}

// A step is an offset of whole seconds and non-negative microseconds, as ADJ_SETOFFSET wants; a slew is in
// microseconds.
func TestClockAdjustment(t *testing.T) {
	for _, tc := range []struct {
		d         time.Duration
		step      bool
		modes     uint32
		sec, usec int64
		offset    int64
	}{
		{-1500 * time.Millisecond, true, unix.ADJ_SETOFFSET, -2, 500_000, 0},
		{time.Hour + 5*time.Microsecond + 999, true, unix.ADJ_SETOFFSET, 3600, 5, 0},
		{-time.Second, true, unix.ADJ_SETOFFSET, -1, 0, 0},
		{-1, true, unix.ADJ_SETOFFSET, 0, 0, 0},
		{-2500 * time.Microsecond, false, unix.ADJ_OFFSET_SINGLESHOT, 0, 0, -2500},
		{40 * time.Millisecond, false, unix.ADJ_OFFSET_SINGLESHOT, 0, 0, 40_000},
	} {
		tx := clockAdjustment(tc.d, tc.step)
		if tx.Modes != tc.modes || tx.Time.Sec != tc.sec || tx.Time.Usec != tc.usec || tx.Offset != tc.offset {
			t.Errorf("%s step %v: modes %#x time %d.%06d offset %d, want %#x %d.%06d %d", tc.d, tc.step,
				tx.Modes, tx.Time.Sec, tx.Time.Usec, tx.Offset, tc.modes, tc.sec, tc.usec, tc.offset)
		}
	}
}

// GuestInfo tells whether the kernel's generator is ready and what the guest's clock says.
func TestGuestInfoReportsRandomAndClock(t *testing.T) {
	ta := startAgent(t, true)
	before := time.Now()
	info, err := ta.agent.GuestInfo(context.Background(), &agentv1.GuestInfoRequest{})
	if err != nil {
		t.Fatal(err)
	}
	// The host running this test has long initialised its generator.
	if !info.RandomReady {
		t.Error("random_ready false on a host whose generator is ready")
	}
	if c := time.Unix(0, info.WallClockUnixNano); c.Before(before) || c.After(time.Now()) {
		t.Errorf("wall clock %v, want between %v and now", c, before)
	}
}

// Before devtmpfs is on /dev, the agent seeds through a node of its own, which it removes again.
func TestOpenRandomWithoutDev(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to make a device node")
	}
	scratch := t.TempDir()
	f, err := openRandom(filepath.Join(t.TempDir(), "missing", "random"), scratch, randomNode)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFCHR || unix.Major(st.Rdev) != 1 || unix.Minor(st.Rdev) != 8 {
		t.Errorf("opened mode %o device %d:%d, want the character device 1:8", st.Mode, unix.Major(st.Rdev), unix.Minor(st.Rdev))
	}
	if left, _ := os.ReadDir(scratch); len(left) != 0 {
		t.Errorf("left %d entries in the scratch directory", len(left))
	}
	if _, err := openRandom("/dev/random", scratch, randomNode); err != nil {
		t.Errorf("open the real device: %v", err)
	}
}

// A node of its own that does not open (the late setup mounted /tmp nodev meanwhile, after /dev) sends the agent
// back to the device, which is there by then; with neither, the error names both.
func TestOpenRandomAfterLateMounts(t *testing.T) {
	dev := filepath.Join(t.TempDir(), "random")
	f, err := openRandom(dev, t.TempDir(), func(string) (*os.File, error) {
		if err := os.WriteFile(dev, nil, 0o600); err != nil { // /dev mounted meanwhile
			t.Fatal(err)
		}
		return nil, errors.New("opening a node of its own failed: permission denied")
	})
	if err != nil {
		t.Fatalf("openRandom: %v, want the device that appeared", err)
	}
	f.Close()
	missing := filepath.Join(t.TempDir(), "random")
	if _, err := openRandom(missing, t.TempDir(), func(string) (*os.File, error) {
		return nil, errors.New("opening a node of its own failed: permission denied")
	}); err == nil || !strings.Contains(err.Error(), missing) || !strings.Contains(err.Error(), "permission denied") {
		t.Errorf("openRandom with neither: %v", err)
	}
}
