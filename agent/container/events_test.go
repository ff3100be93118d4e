package container

import (
	"context"
	"fmt"
	"testing"
	"time"

	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
)

func exitEvent(i int) *agentv1.Event {
	return &agentv1.Event{Event: &agentv1.Event_Exit{Exit: &agentv1.ExitEvent{ContainerId: fmt.Sprint(i)}}}
}

func ids(t *testing.T, s *subscription, n int) []string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	var out []string
	for range n {
		e, err := s.next(ctx)
		if err != nil {
			t.Fatalf("after %v: %v", out, err)
		}
		out = append(out, e.GetExit().GetContainerId())
	}
	return out
}

// With nobody listening, the newest events are kept up to the bound.
func TestEventBacklogBounded(t *testing.T) {
	q := newEventQueue(3)
	for i := range 5 {
		q.publish(exitEvent(i))
	}
	if n, dropped := q.backlogLen(); n != 3 || dropped != 2 {
		t.Fatalf("backlog %d dropped %d, want 3 and 2", n, dropped)
	}
	s := q.subscribe()
	if got := fmt.Sprint(ids(t, s, 3)); got != "[2 3 4]" {
		t.Errorf("backlog delivered %s, want [2 3 4]", got)
	}
	q.publish(exitEvent(9))
	if got := fmt.Sprint(ids(t, s, 1)); got != "[9]" {
		t.Errorf("live event %s, want [9]", got)
	}
	if n, _ := q.backlogLen(); n != 0 {
		t.Errorf("events kept in the backlog while a subscriber listens: %d", n)
	}
}

// An event the stream failed to send, and those still pending, go to the
// next subscriber first.
func TestEventUnsentGoesBack(t *testing.T) {
	q := newEventQueue(10)
	s := q.subscribe()
	q.publish(exitEvent(1))
	q.publish(exitEvent(2))
	e := ids(t, s, 1)
	if e[0] != "1" {
		t.Fatalf("first event %s", e[0])
	}
	s.close(exitEvent(1))
	q.publish(exitEvent(3))
	s2 := q.subscribe()
	if got := fmt.Sprint(ids(t, s2, 3)); got != "[1 2 3]" {
		t.Errorf("next subscriber got %s, want [1 2 3]", got)
	}
}

func TestEventNextHonoursContext(t *testing.T) {
	q := newEventQueue(1)
	s := q.subscribe()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if _, err := s.next(ctx); err == nil {
		t.Fatal("next returned without an event")
	}
}

// backlogLen is the backlog length and the count of events dropped from it.
func (q *eventQueue) backlogLen() (int, int) {
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.backlog), q.dropped
}
