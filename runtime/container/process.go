package container

import (
	"context"
	"fmt"

	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
	"github.com/kiln-runtime/kiln/runtime/stdio"
)

// Process is a container's init process or one started with Exec.
type Process struct {
	c       *Container
	execID  string
	pid     uint32
	streams *stdio.Streams
	exit    *waiter
}

// ID is the exec id, empty for the init process.
func (p *Process) ID() string { return p.execID }

// Pid is the process's pid in the guest.
func (p *Process) Pid() uint32 { return p.pid }

// Exited is closed once the process's exit is known (its output may still be on its way).
func (p *Process) Exited() <-chan struct{} { return p.exit.done }

// Wait blocks until the process has exited and all its output is in the caller's writers, then returns how it
// ended. Output that the guest already sent is waited for up to the manager's DrainTimeout; after that the
// streams are closed and the exit is returned all the same, with the loss logged.
func (p *Process) Wait(ctx context.Context) (Exit, error) {
	e, err := waitExit(ctx, p.exit)
	if err != nil {
		return Exit{}, fmt.Errorf("wait for process %q of container %s: %w", p.execID, p.c.id, err)
	}
	if e.Pid == 0 {
		e.Pid = p.pid
	}
	dctx, cancel := context.WithTimeout(ctx, p.c.m.opts.DrainTimeout)
	defer cancel()
	if err := p.streams.Wait(dctx); err != nil {
		if ctx.Err() != nil {
			return Exit{}, fmt.Errorf("wait for output of process %q of container %s: %w", p.execID, p.c.id, ctx.Err())
		}
		p.c.m.log.WithError(err).WithFields(map[string]any{"container": p.c.id, "exec": p.execID}).
			Warn("output still open after the process exited; closing it")
		_ = p.streams.Close()
	}
	if err := p.streams.Err(); err != nil {
		p.c.m.log.WithError(err).WithFields(map[string]any{"container": p.c.id, "exec": p.execID}).Debug("stdio relay")
	}
	return e, nil
}

// Signal sends signal to this process only.
func (p *Process) Signal(ctx context.Context, signal uint32) error {
	err := p.c.m.request(ctx, func(ctx context.Context) error {
		_, err := p.c.m.api.SignalProcess(ctx, &agentv1.SignalProcessRequest{ContainerId: p.c.id, ExecId: p.execID, Signal: signal})
		return err
	})
	if err != nil {
		return fmt.Errorf("signal %d to process %q of container %s: %w", signal, p.execID, p.c.id, err)
	}
	return nil
}

// Resize sets the process's terminal size.
func (p *Process) Resize(ctx context.Context, width, height uint32) error {
	err := p.c.m.request(ctx, func(ctx context.Context) error {
		_, err := p.c.m.api.ResizeTTY(ctx, &agentv1.ResizeTTYRequest{ContainerId: p.c.id, ExecId: p.execID, Width: width, Height: height})
		return err
	})
	if err != nil {
		return fmt.Errorf("resize terminal of process %q of container %s to %dx%d: %w", p.execID, p.c.id, width, height, err)
	}
	return nil
}

// CloseStdin ends the process's input. With a stdin stream of its own the stream is half-closed, which the
// process sees as EOF after every byte already sent (an RPC could overtake bytes still in flight on the
// stream); otherwise the agent is asked to close it.
func (p *Process) CloseStdin(ctx context.Context) error {
	if p.streams.HasStdin() {
		p.streams.CloseStdin()
		return nil
	}
	err := p.c.m.request(ctx, func(ctx context.Context) error {
		_, err := p.c.m.api.CloseStdin(ctx, &agentv1.CloseStdinRequest{ContainerId: p.c.id, ExecId: p.execID})
		return err
	})
	if err != nil {
		return fmt.Errorf("close stdin of process %q of container %s: %w", p.execID, p.c.id, err)
	}
	return nil
}
