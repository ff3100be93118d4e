package agent

import (
	"bytes"
	"context"
	"errors"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
)

func quietLog() *logrus.Entry {
	l := logrus.New()
	l.SetOutput(io.Discard)
	return logrus.NewEntry(l)
}

// mountAfter is a mount that finds the device on its n-th call (never when n is 0) and counts its calls.
type mountAfter struct {
	n, calls int
	err      error
}

func (m *mountAfter) mount() (bool, error) {
	m.calls++
	if m.err != nil {
		return false, m.err
	}
	return m.n > 0 && m.calls >= m.n, nil
}

func TestWaitShared(t *testing.T) {
	cases := []struct {
		name      string
		m         mountAfter
		wantErr   string
		wantCalls int
	}{
		{"device already bound", mountAfter{n: 1}, "", 1},
		{"device binds later", mountAfter{n: 4}, "", 4},
		{"mount fails", mountAfter{err: errors.New("EIO")}, "EIO", 1},
		{"no device ever", mountAfter{}, "no virtio-fs device with tag " + SharedTag, -1},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			err := waitShared(context.Background(), 50*time.Millisecond, time.Millisecond, tc.m.mount)
			if tc.wantErr == "" && err != nil || tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)) {
				t.Fatalf("waitShared = %v, want error containing %q", err, tc.wantErr)
			}
			if tc.wantCalls >= 0 && tc.m.calls != tc.wantCalls {
				t.Errorf("mount called %d times, want %d", tc.m.calls, tc.wantCalls)
			}
			if tc.wantCalls < 0 && tc.m.calls < 2 {
				t.Errorf("mount called %d times, want retries", tc.m.calls)
			}
		})
	}
}

// A template guest's containers wait for the restore's share mount, which runs once.
func TestTemplateGuestReadyAfterRestored(t *testing.T) {
	g := newGuest(quietLog(), true)
	m := &mountAfter{n: 2}
	g.mountShared = m.mount
	g.finish(nil)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	err := g.Ready(ctx)
	cancel()
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Ready before the restore = %v, want it to wait", err)
	}
	if err := g.Restored(context.Background()); err != nil {
		t.Fatalf("Restored: %v", err)
	}
	if err := g.Restored(context.Background()); err != nil {
		t.Fatalf("Restored again: %v", err)
	}
	if m.calls != 2 {
		t.Errorf("mount called %d times, want 2 (once found, never again)", m.calls)
	}
	if err := g.Ready(context.Background()); err != nil {
		t.Fatalf("Ready after the restore: %v", err)
	}
}

// A guest booted normally mounted its share during setup: Restored does nothing.
func TestRestoredWithoutTemplate(t *testing.T) {
	g := newGuest(quietLog(), false)
	m := &mountAfter{n: 1}
	g.mountShared = m.mount
	if err := g.Restored(context.Background()); err != nil {
		t.Fatal(err)
	}
	if m.calls != 0 {
		t.Errorf("mount called %d times in a guest that is no template", m.calls)
	}
}

func TestRestoredAfterFailedSetup(t *testing.T) {
	g := newGuest(quietLog(), true)
	g.finish(errors.New("load overlay.ko: no such file"))
	if err := g.Restored(context.Background()); err == nil || !strings.Contains(err.Error(), "overlay.ko") {
		t.Fatalf("Restored = %v, want the setup's error", err)
	}
}

func TestAnnounceTemplate(t *testing.T) {
	cases := []struct {
		name     string
		setupErr error
		zeroErr  error
		want     string
	}{
		{"setup done", nil, nil, agentv1.TemplateReadyLine + "\n"},
		{"setup failed", errors.New("mount /sys: EPERM"), nil, ""},
		// Its clones copy more of its memory: no reason not to save it.
		{"free memory not zeroed", nil, errors.New("signal: killed"), agentv1.TemplateReadyLine + "\n"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			g := newGuest(quietLog(), true)
			zeroed := 0
			g.zeroFree = func(context.Context) (int64, error) { zeroed++; return 0, tc.zeroErr }
			var out bytes.Buffer
			done := make(chan struct{})
			go func() {
				g.AnnounceTemplate(context.Background(), &out)
				close(done)
			}()
			select {
			case <-done:
				t.Fatal("announced before the setup ended")
			case <-time.After(20 * time.Millisecond):
			}
			g.finish(tc.setupErr)
			<-done
			if out.String() != tc.want {
				t.Errorf("console got %q, want %q", out.String(), tc.want)
			}
			if want := map[bool]int{true: 1, false: 0}[tc.setupErr == nil]; zeroed != want {
				t.Errorf("free memory zeroed %d times, want %d", zeroed, want)
			}
		})
	}
}

func TestSeedGuestRunsRestored(t *testing.T) {
	cases := []struct {
		name     string
		err      error
		wantCode codes.Code
	}{
		{"restored", nil, codes.OK},
		{"share never appeared", errors.New("no virtio-fs device"), codes.Unavailable},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			f := &fakeSeeder{}
			calls := 0
			srv := &Server{cfg: ServerConfig{Seeder: f, Restored: func(context.Context) error {
				calls++
				if len(f.entropy) != 1 {
					t.Error("Restored ran before the guest was seeded")
				}
				return tc.err
			}}}
			_, err := agentService{srv}.SeedGuest(context.Background(), &agentv1.SeedGuestRequest{Entropy: make([]byte, 64)})
			if got := status.Code(err); got != tc.wantCode {
				t.Fatalf("SeedGuest: %v, want code %s", err, tc.wantCode)
			}
			if calls != 1 {
				t.Errorf("Restored called %d times, want 1", calls)
			}
		})
	}
}
