package sandbox

import (
	"context"
	"io"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
)

// A guest that stops reading its agent connection holds ttrpc's write, which no call's context bounds: Stop
// still moves on after its shutdown timeout, and Check after its own, not after the request timeout.
func TestGuestNotReadingHoldsNeitherStopNorCheck(t *testing.T) {
	for _, call := range []string{"stop", "check"} {
		t.Run(call, func(t *testing.T) {
			stuck := make(chan struct{})
			defer close(stuck)
			stopReading := func(io.Writer, uint32) error { <-stuck; return io.EOF }
			m := &pipeMachine{script: []func(w io.Writer, stream uint32) error{answerServing, answerServing, stopReading}}
			s, err := Start(context.Background(), m, Options{RequestTimeout: 5 * time.Second, ShutdownTimeout: 100 * time.Millisecond, Log: logrus.NewEntry(logrus.New())})
			if err != nil {
				t.Fatal(err)
			}
			defer s.client.Close()
			// A call the guest reads and never answers; it reads nothing more after it.
			ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
			_, _ = s.GuestInfo(ctx)
			cancel()
			start := time.Now()
			if call == "stop" {
				_ = s.Stop(context.Background())
			} else if err := s.Check(context.Background(), 100*time.Millisecond); err == nil {
				t.Error("Check passed a guest that reads nothing")
			}
			if took := time.Since(start); took > 2*time.Second {
				t.Errorf("%s took %s against a guest that reads nothing (its own timeout 100 ms, the request timeout 5 s)", call, took)
			}
		})
	}
}
