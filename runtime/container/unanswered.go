package container

import (
	"context"
	"errors"
	"fmt"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
)

// killGraceDefault is Options.KillGrace's default, agent.request_timeout's default.
const killGraceDefault = 30 * time.Second

// mustAnswer makes call, an agent request that must not fail for want of an answer (a SIGKILL, a container's
// removal), and reports whether the guest was given up for it (abandon) instead of answering. The request runs
// detached from ctx, bounded by the request timeout (and the manager's life) alone: containerd's CRI deletes a
// task under a 10 s deadline, shorter than the request timeout, so a hung agent made each of its retries fail on
// that deadline, the guest was never given up, and kubelet could neither stop nor remove the pod. The caller waits
// for the answer or for its own end; a request it stopped waiting for goes on, and gives the guest up if it
// times out.
func (m *Manager) mustAnswer(ctx context.Context, what string, call func(context.Context) error) (gaveUp bool, err error) {
	type result struct {
		gaveUp bool
		err    error
	}
	done := make(chan result, 1)
	go func() {
		rctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
		defer cancel()
		stop := context.AfterFunc(m.ctx, cancel)
		defer stop()
		err := call(rctx)
		done <- result{err != nil && m.abandon(what, err), err}
	}()
	select {
	case r := <-done:
		return r.gaveUp, r.err
	case <-ctx.Done():
		return false, fmt.Errorf("%s: %w (the request goes on; the guest is given up if it does not answer in time)", what, ctx.Err())
	}
}

// abandon gives up on a guest whose agent let a request that must not fail for want of an answer (mustAnswer)
// run into the request timeout, or whose agent connection is gone (no request reaches it again): a hung agent
// must not leave containers that can be neither killed nor deleted. It reports whether the guest is given up
// (Lost, its VM stopped through Options.Abandon), in which case the caller goes on without the agent.
func (m *Manager) abandon(what string, err error) bool {
	if m.opts.Abandon == nil || !(timedOut(err) || connectionGone(err)) {
		return false
	}
	m.mu.Lock()
	closed, lost := m.closed, m.lost
	m.mu.Unlock()
	if closed {
		// The pod is closing: its stop closes the connection, and stops the VM its own way.
		return false
	}
	if lost != nil {
		return true
	}
	m.giveUp(fmt.Errorf("agent did not answer %s (%w); the VM is stopped", what, err))
	return true
}

// watchKill follows p, to which the agent delivered SIGKILL: when it has not exited after Options.KillGrace, the
// agent is asked for its exit directly (the guest may have lost its exit event), and when that brings no exit
// within the grace either, the guest is given up if its agent no longer answers at all: a lost exit, or a hung
// agent, held the container, and kubelet's stop of the pod, for good. A process that outlives SIGKILL under an
// agent that answers (one blocked in the guest's kernel) is its container's trouble, as under runc, not a reason
// to end its pod's other containers. One watch per process.
func (m *Manager) watchKill(p *Process) {
	p.mu.Lock()
	if p.killWatched {
		p.mu.Unlock()
		return
	}
	p.killWatched = true
	p.mu.Unlock()
	go func() {
		select {
		case <-p.exited:
			return
		case <-m.ctx.Done():
			return
		case <-time.After(m.opts.KillGrace):
		}
		k := p.key()
		ctx, cancel := context.WithTimeout(m.ctx, m.opts.KillGrace)
		defer cancel()
		resp, err := m.api.WaitProcess(ctx, &agentv1.WaitProcessRequest{ContainerId: k.container, ExecId: k.exec})
		switch {
		case err == nil:
			m.settle(p, k, Exit{Status: resp.GetExitStatus(), ExitedAt: exitTime(resp.GetExitedAt())})
			return
		case notInGuest(err):
			// The agent holds no such process: it ended, and the guest lost its exit.
			m.log.WithError(err).WithFields(map[string]any{"container": k.container, "exec": k.exec}).Warn("the guest lost the exit of a process SIGKILL was delivered to; reported killed")
			m.settle(p, k, Exit{Status: 128 + sigKill})
			return
		}
		select {
		case <-p.exited:
			return
		default:
		}
		if m.ctx.Err() != nil {
			return
		}
		// Is the agent there at all? Any answer says it is.
		_, perr := m.api.ListProcesses(m.ctx, &agentv1.ListProcessesRequest{ContainerId: k.container})
		if m.abandon(fmt.Sprintf("with the exit of %s, %s after SIGKILL, nor a request after", p.describe(), 2*m.opts.KillGrace), perr) {
			return
		}
		m.log.WithError(err).WithFields(map[string]any{"container": k.container, "exec": k.exec}).Warnf("no exit %s after SIGKILL, though the agent answers: the process outlives SIGKILL in the guest", 2*m.opts.KillGrace)
	}()
}

// undo takes back what a request whose answer the host stopped waiting for (its caller's deadline, or the request
// timeout) may have done in the guest all the same: call removes it there. The host forgets such a container or
// exec, and the guest kept it: a container with its waiting init, cgroup and state until the pod ended, an exec's
// process (a `kubectl exec -it` shell) running on with no one on the host to wait for it or kill it. Best effort,
// bounded by the request timeout; the agent's NotFound means there was nothing to take back. The caller holds
// the id meanwhile, so that a retry cannot start something the undo then removes.
func (m *Manager) undo(reqErr error, what string, call func(context.Context) error) {
	if !unanswered(reqErr) || m.guestLost() != nil {
		return
	}
	if err := call(m.ctx); err != nil && !notInGuest(err) {
		m.log.WithError(err).Warn("take back " + what + ", whose request was given up")
	}
}

// unanswered says whether a request failed for want of the agent's answer (a deadline, a cancellation), as opposed
// to the agent's refusal or a connection that is gone (whose guest is being given up): the guest may have done it.
func unanswered(err error) bool {
	return timedOut(err) || errors.Is(err, context.Canceled) || status.Code(err) == codes.Canceled
}
