package task

import (
	"context"

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

// forward publishes queued events one at a time, so containerd sees them in the order they happened.
func (s *Service) forward(ctx context.Context) {
	ns := s.namespace
	for e := range s.events {
		err := s.publisher.Publish(ctx, topic(e), e)
		if err != nil {
			log.G(ctx).WithError(err).WithField("topic", topic(e)).WithField("namespace", ns).Error("publish event")
		}
	}
	_ = s.publisher.Close()
}

// onContainerEvent sees the guest's exit and OOM events. Exits are published by each process's watcher, after
// its output has been delivered; OOM kills are published here.
func (s *Service) onContainerEvent(e container.Event) {
	if e.Kind == container.EventOOM {
		s.send(&eventstypes.TaskOOM{ContainerID: e.ContainerID})
	}
}

// watch waits for a process's end and its output, records the exit and publishes it.
func (s *Service) watch(p *proc) {
	h := p.handle()
	e, err := h.Wait(s.ctx)
	l := s.log(p.task.id, p.execID)
	if err != nil {
		// Deleted, or the sandbox went away: whoever did that settles the process.
		l.WithError(err).Debug("process wait ended without an exit")
		return
	}
	if p.io != nil {
		if err := p.io.Close(); err != nil {
			l.WithError(err).Warn("close process IO")
		}
	}
	if !p.finish(e) {
		return
	}
	l.WithField("status", e.Status).Debug("process exited")
	// Wait for a Start in progress to queue its start event first.
	s.startMu.Lock()
	s.startMu.Unlock()
	s.send(&eventstypes.TaskExit{
		ContainerID: p.task.id,
		ID:          p.id(),
		Pid:         e.Pid,
		ExitStatus:  e.Status,
		ExitedAt:    protobuf.ToTimestamp(e.ExitedAt),
	})
}
