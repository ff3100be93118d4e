package task

import (
	"sync"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/kiln-runtime/kiln/runtime/container"
)

// proc is a task's init process or one of its exec processes, as the task service tracks it.
type proc struct {
	task   *task
	execID string
	lc     lifecycle
	ioSpec ioSpec
	io     *procIO
	// spec is an exec process's OCI process, kept between Exec and Start.
	spec *specs.Process

	mu   sync.Mutex
	h    *container.Process
	pid  uint32
	exit container.Exit
	// exited is closed once the process has ended and its output has been delivered.
	exited   chan struct{}
	exitOnce sync.Once
}

func newProc(t *task, execID string, spec ioSpec) *proc {
	return &proc{task: t, execID: execID, ioSpec: spec, exited: make(chan struct{})}
}

// id is the process id containerd uses in events: the container id for init, else the exec id.
func (p *proc) id() string {
	if p.execID == "" {
		return p.task.id
	}
	return p.execID
}

func (p *proc) handle() *container.Process {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.h
}

func (p *proc) setHandle(h *container.Process) {
	p.mu.Lock()
	p.h, p.pid = h, h.Pid()
	p.mu.Unlock()
}

func (p *proc) getPid() uint32 {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.pid
}

// finish records how the process ended, once; it reports whether this call was the one that did.
func (p *proc) finish(e container.Exit) bool {
	done := false
	p.exitOnce.Do(func() {
		if e.ExitedAt.IsZero() {
			e.ExitedAt = time.Now()
		}
		p.mu.Lock()
		if e.Pid == 0 {
			e.Pid = p.pid
		}
		p.exit = e
		p.mu.Unlock()
		p.lc.mu.Lock()
		if allowed(p.lc.state, stateStopped) {
			p.lc.state = stateStopped
		}
		p.lc.mu.Unlock()
		close(p.exited)
		done = true
	})
	return done
}

func (p *proc) exitStatus() (container.Exit, bool) {
	select {
	case <-p.exited:
		p.mu.Lock()
		defer p.mu.Unlock()
		return p.exit, true
	default:
		return container.Exit{}, false
	}
}

// task is one container: its init process, exec processes and bundle.
type task struct {
	id     string
	bundle string
	ctr    *container.Container
	init   *proc

	mu    sync.Mutex
	execs map[string]*proc
}

func (t *task) process(execID string) (*proc, bool) {
	if execID == "" {
		return t.init, true
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	p, ok := t.execs[execID]
	return p, ok
}
