package container

import (
	"context"
	"sync"

	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
)

// DefaultEventBacklog bounds the events kept for a subscriber that has not
// come yet (or is slow); the oldest go first.
const DefaultEventBacklog = 1024

// eventQueue fans events out to subscribers and keeps them, bounded, while
// nobody listens: a host that reconnects must still learn about exits.
type eventQueue struct {
	max int

	mu      sync.Mutex
	backlog []*agentv1.Event
	dropped int
	subs    map[*subscription]struct{}
}

func newEventQueue(max int) *eventQueue {
	if max <= 0 {
		max = DefaultEventBacklog
	}
	return &eventQueue{max: max, subs: map[*subscription]struct{}{}}
}

// publish never blocks: it runs on the paths that report exits.
func (q *eventQueue) publish(e *agentv1.Event) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if len(q.subs) == 0 {
		q.backlog, q.dropped = appendBounded(q.backlog, q.max, q.dropped, e)
		return
	}
	for s := range q.subs {
		s.push(e)
	}
}

// appendBounded appends e, dropping the oldest events beyond max.
func appendBounded(list []*agentv1.Event, max, dropped int, e *agentv1.Event) ([]*agentv1.Event, int) {
	list = append(list, e)
	if over := len(list) - max; over > 0 {
		list = append(list[:0:0], list[over:]...)
		dropped += over
	}
	return list, dropped
}

// subscribe starts a subscription that first gets the backlog.
func (q *eventQueue) subscribe() *subscription {
	q.mu.Lock()
	defer q.mu.Unlock()
	s := &subscription{q: q, max: q.max, wake: make(chan struct{}, 1)}
	s.pending, q.backlog = q.backlog, nil
	if len(s.pending) > 0 {
		s.wake <- struct{}{}
	}
	q.subs[s] = struct{}{}
	return s
}

// subscription is one subscriber's own bounded queue.
type subscription struct {
	q    *eventQueue
	max  int
	wake chan struct{}

	mu      sync.Mutex
	pending []*agentv1.Event
	dropped int
}

func (s *subscription) push(e *agentv1.Event) {
	s.mu.Lock()
	s.pending, s.dropped = appendBounded(s.pending, s.max, s.dropped, e)
	s.mu.Unlock()
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// next returns the oldest pending event, waiting for one until ctx is done.
func (s *subscription) next(ctx context.Context) (*agentv1.Event, error) {
	for {
		s.mu.Lock()
		if len(s.pending) > 0 {
			e := s.pending[0]
			s.pending = s.pending[1:]
			s.mu.Unlock()
			return e, nil
		}
		s.mu.Unlock()
		select {
		case <-s.wake:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

// close ends the subscription. unsent (an event taken but not delivered)
// and everything still pending go back to the queue's backlog, ahead of
// newer events, when no other subscriber is there to have them.
func (s *subscription) close(unsent *agentv1.Event) {
	s.q.mu.Lock()
	defer s.q.mu.Unlock()
	delete(s.q.subs, s)
	s.mu.Lock()
	left := s.pending
	s.pending = nil
	s.mu.Unlock()
	if unsent != nil {
		left = append([]*agentv1.Event{unsent}, left...)
	}
	if len(left) == 0 {
		return
	}
	// Any other subscriber will do: subscribers are interchangeable hosts.
	for other := range s.q.subs {
		for _, e := range left {
			other.push(e)
		}
		return
	}
	merged := append(left, s.q.backlog...)
	if over := len(merged) - s.q.max; over > 0 {
		merged = merged[over:]
		s.q.dropped += over
	}
	s.q.backlog = merged
}
