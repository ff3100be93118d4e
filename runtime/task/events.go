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

// onEvent publishes the guest's OOM kills. Exits are published by onExit, once their output is delivered.
func (s *Service) onEvent(e container.Event) {
	if e.Kind == container.EventOOM {
		s.send(&eventstypes.TaskOOM{ContainerID: e.ContainerID})
	}
}

// onExit publishes a process's exit; runtime/container calls it after the process's start was published.
func (s *Service) onExit(p *container.Process, e container.Exit) {
	c := p.Container()
	s.log(c.ID(), p.ID()).WithField("status", e.Status).Debug("process exited")
	s.send(&eventstypes.TaskExit{
		ContainerID: c.ID(),
		ID:          processID(c, p),
		Pid:         e.Pid,
		ExitStatus:  e.Status,
		ExitedAt:    protobuf.ToTimestamp(e.ExitedAt),
	})
}
