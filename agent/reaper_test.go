package agent

import (
	"context"
	"errors"
	"io"
	"syscall"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"
)

// A child nobody waits for must not stay a zombie: kill(pid, 0) succeeds on
// a zombie and fails with ESRCH once it is reaped.
func TestReaperReapsUnwaitedChild(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	log := logrus.New()
	log.SetOutput(io.Discard)
	StartReaper(ctx, logrus.NewEntry(log))

	pid, err := syscall.ForkExec("/bin/true", []string{"true"}, &syscall.ProcAttr{})
	if err != nil {
		t.Skipf("cannot start /bin/true: %v", err)
	}
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
