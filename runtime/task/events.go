package task

import (
	"context"
	"sync"
	"time"

	eventstypes "github.com/containerd/containerd/api/events"
	"github.com/containerd/containerd/v2/core/runtime"
	"github.com/containerd/containerd/v2/pkg/protobuf"
	"github.com/containerd/log"

	"github.com/kiln-runtime/kiln/runtime/container"
)

// eventQueue is how many events may wait for containerd before a request that publishes one blocks.
const eventQueue = 128

// topic is the containerd topic an event is published on.
func topic(e any) string {
	switch e.(type) {
	case *eventstypes.TaskCreate:
		return runtime.TaskCreateEventTopic
	case *eventstypes.TaskStart:
		return runtime.TaskStartEventTopic
	case *eventstypes.TaskExit:
		return runtime.TaskExitEventTopic
	case *eventstypes.TaskDelete:
		return runtime.TaskDeleteEventTopic
	case *eventstypes.TaskExecAdded:
		return runtime.TaskExecAddedEventTopic
	case *eventstypes.TaskExecStarted:
		return runtime.TaskExecStartedEventTopic
	case *eventstypes.TaskPaused:
		return runtime.TaskPausedEventTopic
	case *eventstypes.TaskResumed:
		return runtime.TaskResumedEventTopic
	case *eventstypes.TaskOOM:
		return runtime.TaskOOMEventTopic
	case *eventstypes.TaskCheckpointed:
		return runtime.TaskCheckpointedEventTopic
	}
	return runtime.TaskUnknownTopic
}

// send queues an event for containerd, in order.
func (s *Service) send(e any) {
	s.events <- e
}

// sendOf queues an event of container id, or holds it while the container's TaskCreate is not out (announce).
func (s *Service) sendOf(id string, e any) {
	s.mu.Lock()
	if held, ok := s.unannounced[id]; ok {
		s.unannounced[id] = append(held, e)
		s.mu.Unlock()
		return
	}
	s.mu.Unlock()
	s.send(e)
}

// unannounce holds the events of container id (sendOf) until announce, or dropUnannounced, ends the hold. It
// reports false when another Create holds them already.
func (s *Service) unannounce(id string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.unannounced[id]; ok {
		return false
	}
	if s.unannounced == nil {
		s.unannounced = map[string][]any{}
	}
	s.unannounced[id] = nil
	return true
}

// announce queues the container's TaskCreate, then the events held back meanwhile. The hold lasts until it is
// drained, so that an event coming meanwhile queues behind the held ones.
func (s *Service) announce(id string, create *eventstypes.TaskCreate) {
	s.send(create)
	for {
		s.mu.Lock()
		held := s.unannounced[id]
		if len(held) == 0 {
			delete(s.unannounced, id)
			s.mu.Unlock()
			return
		}
		s.unannounced[id] = nil
		s.mu.Unlock()
		for _, e := range held {
			s.send(e)
		}
	}
}

// dropUnannounced ends the hold of a container whose Create failed: containerd knows no task of it.
func (s *Service) dropUnannounced(id string) {
	s.mu.Lock()
	held := s.unannounced[id]
	delete(s.unannounced, id)
	s.mu.Unlock()
	for _, e := range held {
		if _, ok := e.(*eventstypes.TaskOOM); ok {
			// Never published: the next OOM of the id is news again.
			s.ooms.done(id)
		}
	}
}

// eventsFlushed, queued, is closed once every event queued before it was published (flushEvents).
type eventsFlushed chan struct{}

// flushEventsTimeout bounds how long a shim's shutdown waits for the events still queued to reach containerd.
const flushEventsTimeout = 5 * time.Second

// flushEvents waits until the events queued so far were published, or ctx or flushEventsTimeout ends first.
func (s *Service) flushEvents(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, flushEventsTimeout)
	defer cancel()
	done := make(eventsFlushed)
	select {
	case s.events <- done:
	case <-ctx.Done():
		return
	}
	select {
	case <-done:
	case <-ctx.Done():
	}
}

// forward publishes queued events one at a time, so containerd sees them in the order they happened. Publishing
// does not end with the shim's context: the last events (a task's exit and delete) go out as the shim shuts down.
func (s *Service) forward(ctx context.Context) {
	ns := s.namespace
	pctx := context.WithoutCancel(ctx)
	for e := range s.events {
		if done, ok := e.(eventsFlushed); ok {
			close(done)
			continue
		}
		err := s.publisher.Publish(pctx, topic(e), e)
		if err != nil {
			log.G(ctx).WithError(err).WithField("topic", topic(e)).WithField("namespace", ns).Error("publish event")
		}
		if oom, ok := e.(*eventstypes.TaskOOM); ok {
			if merged := s.ooms.done(oom.ContainerID); merged > 0 {
				log.G(ctx).WithField("container", oom.ContainerID).WithField("merged", merged).
					Warn("guest reported more OOM kills while one waited for containerd; published as one")
			}
		}
	}
	_ = s.publisher.Close()
}

// oomQueue coalesces a container's OOM events: at most one TaskOOM per container waits for containerd or is
// being published, and the OOMs the guest reports meanwhile are merged into it. The guest decides how many OOM
// events it sends, and the event loop that passes them on also passes on exits, so a flood must cost neither a
// queue slot per event nor a blocked loop (containerd learns only that the container was OOM-killed, not how
// often). Its size is bounded by the pod's containers: only OOMs of containers the host holds get here.
type oomQueue struct {
	mu sync.Mutex
	// pending maps a container with a TaskOOM in flight to the OOMs merged into it since.
	pending map[string]uint64
}

// add reports whether an OOM of container id is to be queued: false when one already is (it is merged).
func (q *oomQueue) add(id string) bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	if n, ok := q.pending[id]; ok {
		q.pending[id] = n + 1
		return false
	}
	if q.pending == nil {
		q.pending = map[string]uint64{}
	}
	q.pending[id] = 0
	return true
}

// done ends container id's TaskOOM in flight, once published, and returns how many OOMs were merged into it.
func (q *oomQueue) done(id string) uint64 {
	q.mu.Lock()
	defer q.mu.Unlock()
	n := q.pending[id]
	delete(q.pending, id)
	return n
}

// onEvent publishes the guest's OOM kills, one at a time per container (oomQueue). Exits are published by
// onExit, once their output is delivered.
func (s *Service) onEvent(e container.Event) {
	if e.Kind == container.EventOOM && s.ooms.add(e.ContainerID) {
		s.sendOf(e.ContainerID, &eventstypes.TaskOOM{ContainerID: e.ContainerID})
	}
}

// onExit publishes a process's exit; runtime/container calls it after the process's start was published.
func (s *Service) onExit(p *container.Process, e container.Exit) {
	c := p.Container()
	s.log(c.ID(), p.ID()).WithField("status", e.Status).Debug("process exited")
	// containerd gets the container's host pid for each of its processes, as everywhere else.
	e.Pid = c.HostPid()
	s.sendExit(c.ID(), processID(c, p), e)
}

// sendExit queues the exit of process id of container containerID (sendOf).
func (s *Service) sendExit(containerID, id string, e container.Exit) {
	s.sendOf(containerID, &eventstypes.TaskExit{
		ContainerID: containerID,
		ID:          id,
		Pid:         e.Pid,
		ExitStatus:  e.Status,
		ExitedAt:    protobuf.ToTimestamp(e.ExitedAt),
	})
}
