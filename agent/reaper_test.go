package agent

import (
	"context"
	"errors"
	"io"
	"os/exec"
	"syscall"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"
)

func testReaper(t *testing.T) *Reaper {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	log := logrus.New()
	log.SetOutput(io.Discard)
	r := StartReaper(ctx, logrus.NewEntry(log))
	// A reaper left running would reap the next test's children.
	t.Cleanup(func() {
		cancel()
		<-r.stopped
	})
	return r
}

func waitGone(t *testing.T, pid int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		err := unix.Kill(pid, 0)
		if errors.Is(err, unix.ESRCH) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("child %d still exists (kill: %v)", pid, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// A child nobody waits for must not stay a zombie: kill(pid, 0) succeeds on
// a zombie and fails with ESRCH once it is reaped.
func TestReaperReapsUnwaitedChild(t *testing.T) {
	testReaper(t)
	pid, err := syscall.ForkExec("/bin/true", []string{"true"}, &syscall.ProcAttr{})
	if err != nil {
		t.Skipf("cannot start /bin/true: %v", err)
	}
	waitGone(t, pid)
}

// The classic bug: a claimed child's exit status belongs to its owner.
func TestReaperLeavesClaimedChild(t *testing.T) {
	r := testReaper(t)
	release := r.Hold()
	cmd := exec.Command("/bin/sh", "-c", "exit 7")
	if err := cmd.Start(); err != nil {
		t.Skipf("cannot start /bin/sh: %v", err)
	}
	unclaim := r.Claim(cmd.Process.Pid)
	release()
	// Give the reaper SIGCHLDs and time to misbehave.
	time.Sleep(200 * time.Millisecond)
	err := cmd.Wait()
	unclaim()
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.ExitCode() != 7 {
		t.Fatalf("owner's wait: %v, want exit status 7", err)
	}
}

// Children exiting while the reaper is held stay for their owner, and
// unclaimed ones are reaped once the hold ends.
func TestReaperHoldDefers(t *testing.T) {
	r := testReaper(t)
	release := r.Hold()
	pid, err := syscall.ForkExec("/bin/true", []string{"true"}, &syscall.ProcAttr{})
	if err != nil {
		t.Skipf("cannot start /bin/true: %v", err)
	}
	time.Sleep(200 * time.Millisecond)
	var ws unix.WaitStatus
	if got, err := unix.Wait4(pid, &ws, unix.WNOHANG, nil); err != nil || got != pid {
		// Still ours while held: the owner could collect it.
		t.Fatalf("child reaped during a hold: wait4 = %d, %v", got, err)
	}
	pid2, err := syscall.ForkExec("/bin/true", []string{"true"}, &syscall.ProcAttr{})
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond)
	release()
	waitGone(t, pid2)
}

func TestParseStat(t *testing.T) {
	tests := []struct {
		in    string
		state byte
		ppid  int
		ok    bool
	}{
		{"42 (sh) Z 1 42 42 0 -1", 'Z', 1, true},
		{"43 (a) b (c)) S 7 1", 'S', 7, true},
		{"44 (x y) R 12", 'R', 12, true},
		{"garbage", 0, 0, false},
		{"45 (x) Z notanumber", 0, 0, false},
	}
	for _, tt := range tests {
		state, ppid, ok := parseStat(tt.in)
		if state != tt.state || ppid != tt.ppid || ok != tt.ok {
			t.Errorf("parseStat(%q) = %c %d %v", tt.in, state, ppid, ok)
		}
	}
}
