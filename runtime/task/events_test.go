package task

import (
	"context"
	"slices"
	"sync"
	"testing"
	"time"

	eventstypes "github.com/containerd/containerd/api/events"
	"github.com/containerd/containerd/v2/core/events"

	"github.com/kiln-runtime/kiln/runtime/container"
)

// stalledPublisher stands in for a containerd that is slow to take events: its first Publish waits for
// release. It records what it was given.
type stalledPublisher struct {
	release chan struct{}
	closed  chan struct{}
	once    sync.Once

	mu   sync.Mutex
	got  []any
	wait bool
}

func (p *stalledPublisher) Publish(_ context.Context, _ string, e events.Event) error {
	p.mu.Lock()
	first := !p.wait
	p.wait = true
	p.mu.Unlock()
	if first {
		<-p.release
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.got = append(p.got, e)
	return nil
}

func (p *stalledPublisher) Close() error {
	p.once.Do(func() { close(p.closed) })
	return nil
}

// A guest that floods OOM events for one container while containerd is slow cannot crowd out an exit: the
// OOMs merge into the one waiting (one TaskOOM for the flood), the event loop that also carries exits is not
// blocked, another container's OOM is not merged away, and the exit behind the flood is published.
func TestOOMFloodDoesNotCrowdOutExit(t *testing.T) {
	const flood = 5000
	pub := &stalledPublisher{release: make(chan struct{}), closed: make(chan struct{})}
	s := &Service{namespace: "test", publisher: pub, events: make(chan any, eventQueue)}
	go s.forward(context.Background())

	loopDone := make(chan struct{})
	go func() { // runtime/container's event loop: OnEvent for each OOM, then the exit that followed them
		defer close(loopDone)
		for i := 0; i < flood; i++ {
			s.onEvent(container.Event{Kind: container.EventOOM, ContainerID: "c1"})
		}
		s.onEvent(container.Event{Kind: container.EventOOM, ContainerID: "c2"})
		s.sendExit("c1", "c1", container.Exit{Pid: 7, Status: 137})
	}()
	// containerd stays stalled until the loop is through, or until the queue is full and the loop blocked
	// behind the flood (as it did when each OOM took a queue slot); then it takes everything.
	deadline := time.Now().Add(time.Minute)
	for !isClosed(loopDone) && len(s.events) < cap(s.events) {
		if time.Now().After(deadline) {
			t.Fatal("neither got the event loop through the flood nor filled the event queue")
		}
		time.Sleep(time.Millisecond)
	}
	close(pub.release)
	<-loopDone
	close(s.events)
	<-pub.closed

	pub.mu.Lock()
	defer pub.mu.Unlock()
	ooms := map[string]int{}
	exits := 0
	for _, e := range pub.got {
		switch e := e.(type) {
		case *eventstypes.TaskOOM:
			ooms[e.ContainerID]++
		case *eventstypes.TaskExit:
			if e.ContainerID == "c1" && e.ID == "c1" && e.ExitStatus == 137 && e.Pid == 7 {
				exits++
			}
		}
	}
	if exits != 1 {
		t.Errorf("published %d exits of c1, want 1", exits)
	}
	// The first OOM was waiting for containerd for the whole flood, so every other one merged into it.
	if ooms["c1"] != 1 || ooms["c2"] != 1 {
		t.Errorf("published OOMs per container %v after %d OOMs of c1 and one of c2: want one each", ooms, flood)
	}
}

// Once a container's TaskOOM is published, its next OOM is published too: merging lasts only while one waits.
func TestOOMAfterPublishedOOMIsPublished(t *testing.T) {
	var q oomQueue
	if !q.add("c1") || q.add("c1") || q.add("c1") {
		t.Fatal("second and third OOM of c1 not merged into the first")
	}
	if n := q.done("c1"); n != 2 {
		t.Errorf("merged %d, want 2", n)
	}
	if !q.add("c1") {
		t.Error("OOM after the published one was merged")
	}
	if len(q.pending) != 1 || q.done("c1") != 0 || len(q.pending) != 0 {
		t.Errorf("pending %v after done, want none", q.pending)
	}
}

// A container's events that come before its Create published TaskCreate (an init the guest lost, or the OOM killer
// took, while the Create went on) wait for it: containerd gets no exit of a task it was not told of. A Create
// that fails drops them; another container's events are not held.
func TestEventsWaitForTheTaskCreate(t *testing.T) {
	s := &Service{namespace: "test", events: make(chan any, eventQueue)}
	if !s.unannounce("c1") || !s.unannounce("c2") {
		t.Fatal("unannounce refused a first hold")
	}
	if s.unannounce("c1") {
		t.Error("a second Create of c1 held its events too")
	}
	s.onEvent(container.Event{Kind: container.EventOOM, ContainerID: "c1"})
	s.sendExit("c1", "c1", container.Exit{Status: 137})
	s.sendExit("c2", "c2", container.Exit{Status: 137})
	s.sendExit("c3", "c3", container.Exit{Status: 0})
	s.onEvent(container.Event{Kind: container.EventOOM, ContainerID: "c2"})
	s.announce("c1", &eventstypes.TaskCreate{ContainerID: "c1"})
	s.dropUnannounced("c2")
	s.sendExit("c1", "e1", container.Exit{Status: 1})
	// The OOM dropped with c2's Create was never published: the next one is.
	s.onEvent(container.Event{Kind: container.EventOOM, ContainerID: "c2"})
	close(s.events)
	var got []string
	for e := range s.events {
		switch e := e.(type) {
		case *eventstypes.TaskCreate:
			got = append(got, "create "+e.ContainerID)
		case *eventstypes.TaskOOM:
			got = append(got, "oom "+e.ContainerID)
		case *eventstypes.TaskExit:
			got = append(got, "exit "+e.ContainerID+"/"+e.ID)
		}
	}
	want := []string{"exit c3/c3", "create c1", "oom c1", "exit c1/c1", "exit c1/e1", "oom c2"}
	if !slices.Equal(got, want) {
		t.Errorf("events %q, want %q", got, want)
	}
}
