// Package container owns the host's handles on the containers of one sandbox: it drives the guest agent's
// Containers API (create, start, exec, signal, pause, update, stats, delete), attaches each process's stdio
// through runtime/stdio, follows the agent's single Events stream to learn of exits and OOM kills, and keeps each
// container's lifecycle as an explicit state machine. It is shaped for containerd's task service but knows
// nothing of containerd, of the VMM, or of how a rootfs reached the guest: callers pass a guest rootfs path and
// a spec whose host paths are already rewritten.
package container

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/sirupsen/logrus"

	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
	"github.com/kiln-runtime/kiln/runtime/stdio"
)

// Errors callers can test for with errors.Is.
var (
	ErrNotFound      = errors.New("not found")
	ErrAlreadyExists = errors.New("already exists")
	ErrInvalidState  = errors.New("invalid state")
	// ErrClosed is returned to waiters when the manager closed or the agent connection ended before an exit
	// was seen.
	ErrClosed = errors.New("container manager closed")
	// ErrDeleted fails the waits of processes whose container was deleted before their exit was seen.
	ErrDeleted = errors.New("deleted before its exit was seen")
)

// Options tune a Manager.
type Options struct {
	// RequestTimeout bounds each agent request (never the wait for an exit). Default 30 s.
	RequestTimeout time.Duration
	// DrainTimeout bounds how long Wait waits, after an exit, for the output the guest already sent. Default 30 s.
	DrainTimeout time.Duration
	// Events, when set, is the client the Events stream is opened on (sandbox.StreamClient), so that the stream
	// has a connection of its own; otherwise the stream shares the request client.
	Events agentv1.ContainersClient
	// OnEvent, when set, sees every exit and OOM event, in order, from the event loop's goroutine: it must not
	// block.
	OnEvent func(Event)
	Log     *logrus.Entry
}

// Manager holds the containers of one sandbox.
type Manager struct {
	api    agentv1.ContainersClient
	dialer stdio.Dialer
	opts   Options
	log    *logrus.Entry

	ctx      context.Context
	cancel   context.CancelFunc
	loopDone chan struct{}

	mu         sync.Mutex
	containers map[string]*Container
	waiters    map[exitKey]*waiter
	closed     bool
	// noEvents is set when the agent has no events stream; each process's exit is then waited for directly.
	noEvents bool
}

// NewManager starts following the agent's events. api is the agent's container API (sandbox.Containers), dialer
// reaches the guest's stdio port (the sandbox's machine). Close releases it.
func NewManager(api agentv1.ContainersClient, dialer stdio.Dialer, opts Options) *Manager {
	if opts.RequestTimeout <= 0 {
		opts.RequestTimeout = 30 * time.Second
	}
	if opts.DrainTimeout <= 0 {
		opts.DrainTimeout = 30 * time.Second
	}
	if opts.Log == nil {
		opts.Log = logrus.NewEntry(logrus.StandardLogger())
	}
	ctx, cancel := context.WithCancel(context.Background())
	m := &Manager{
		api: api, dialer: dialer, opts: opts, log: opts.Log,
		ctx: ctx, cancel: cancel, loopDone: make(chan struct{}),
		containers: map[string]*Container{}, waiters: map[exitKey]*waiter{},
	}
	go m.followEvents()
	return m
}

// Close stops following events and fails every pending Wait with ErrClosed. It does not touch the guest's
// containers: stopping the sandbox ends them.
func (m *Manager) Close() error {
	m.mu.Lock()
	m.closed = true
	cs := make([]*Container, 0, len(m.containers))
	for _, c := range m.containers {
		cs = append(cs, c)
	}
	m.mu.Unlock()
	m.cancel()
	<-m.loopDone
	m.failWaiters(ErrClosed)
	for _, c := range cs {
		c.closeStreams()
	}
	return nil
}

// CreateOptions describe a container to create.
type CreateOptions struct {
	ID string
	// Spec is the OCI runtime spec (config.json) as JSON, with host paths already rewritten to guest paths.
	// Its root.path is ignored.
	Spec []byte
	// Rootfs is the container's root relative to the guest's shared directory ("<id>/rootfs").
	Rootfs string
	// IO is attached to the container's init process.
	IO stdio.IO
}

// Create builds the container in the guest (its init waits to be started) with its stdio attached.
func (m *Manager) Create(ctx context.Context, o CreateOptions) (*Container, error) {
	if o.ID == "" {
		return nil, errors.New("create container: empty id")
	}
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return nil, fmt.Errorf("create container %s: %w", o.ID, ErrClosed)
	}
	if _, ok := m.containers[o.ID]; ok {
		m.mu.Unlock()
		return nil, fmt.Errorf("create container %s: %w", o.ID, ErrAlreadyExists)
	}
	c := &Container{id: o.ID, m: m, execs: map[string]*Process{}}
	// Reserve the id while the guest works, so a second Create with the same id fails here.
	m.containers[o.ID] = c
	m.mu.Unlock()

	p, err := m.startProcess(ctx, c, "", o.IO, func(rctx context.Context, sp *agentv1.Stdio) (uint32, error) {
		resp, err := m.api.CreateContainer(rctx, &agentv1.CreateContainerRequest{
			ContainerId: o.ID, OciSpec: o.Spec, Rootfs: o.Rootfs, Stdio: sp,
		})
		return resp.GetPid(), err
	})
	if err != nil {
		m.mu.Lock()
		delete(m.containers, o.ID)
		m.mu.Unlock()
		return nil, fmt.Errorf("create container %s: %w", o.ID, err)
	}
	// Get, List and Close read init under these locks.
	m.mu.Lock()
	c.mu.Lock()
	c.init = p
	c.mu.Unlock()
	m.mu.Unlock()
	return c, nil
}

// startProcess opens a process's streams, registers for its exit before the guest can report one, makes the
// agent request, and starts relaying.
func (m *Manager) startProcess(ctx context.Context, c *Container, execID string, io stdio.IO,
	request func(context.Context, *agentv1.Stdio) (uint32, error)) (*Process, error) {
	streams, err := stdio.Open(ctx, m.dialer, io)
	if err != nil {
		return nil, err
	}
	key := exitKey{c.id, execID}
	w, err := m.register(key)
	if err != nil {
		_ = streams.Close()
		return nil, err
	}
	rctx, cancel := context.WithTimeout(ctx, m.opts.RequestTimeout)
	pid, err := request(rctx, streams.Proto())
	cancel()
	if err != nil {
		m.unregister(key)
		_ = streams.Close()
		return nil, err
	}
	streams.Start()
	m.mu.Lock()
	direct := m.noEvents
	m.mu.Unlock()
	if direct {
		go m.waitProcess(key)
	}
	return &Process{c: c, execID: execID, pid: pid, streams: streams, exit: w}, nil
}

// Get returns a container this manager created.
func (m *Manager) Get(id string) (*Container, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	c, ok := m.containers[id]
	if !ok || c.init == nil {
		return nil, fmt.Errorf("container %s: %w", id, ErrNotFound)
	}
	return c, nil
}

// List returns the containers this manager holds.
func (m *Manager) List() []*Container {
	m.mu.Lock()
	defer m.mu.Unlock()
	var cs []*Container
	for _, c := range m.containers {
		if c.init != nil {
			cs = append(cs, c)
		}
	}
	return cs
}

func (m *Manager) forget(id string) {
	m.mu.Lock()
	delete(m.containers, id)
	m.mu.Unlock()
}

// request runs one bounded agent request.
func (m *Manager) request(ctx context.Context, f func(context.Context) error) error {
	ctx, cancel := context.WithTimeout(ctx, m.opts.RequestTimeout)
	defer cancel()
	return f(ctx)
}
