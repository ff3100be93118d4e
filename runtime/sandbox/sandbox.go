// Package sandbox owns one microVM together with its agent connection: it boots the machine, waits until the
// agent answers on vsock, and stops the guest gracefully (agent shutdown, then the VMM's own stop). It depends on
// the vm.Machine interface, never on a particular VMM, and knows nothing of containerd.
package sandbox

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/ttrpc"
	"github.com/sirupsen/logrus"

	"github.com/kiln-runtime/kiln/config"
	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
	"github.com/kiln-runtime/kiln/vm"
)

// AgentPort is the vsock port the guest agent serves ttrpc on.
const AgentPort = agentv1.APIPort

// firstHealthTimeout bounds the first health check of a booting guest's agent; later attempts double it.
const firstHealthTimeout = time.Second

// dialRetryInterval is how often the host retries while the guest is still booting, when the machine cannot
// tell it that the agent listens (readyListener). Each refused attempt interrupts the guest: under TCG, polling
// every 5 ms took about 40 ms off a cold boot's progress by the time its agent listened.
const dialRetryInterval = 5 * time.Millisecond

// announcedRetryInterval is Options.RedialInterval's default: the announcement ends the wait, and the retries
// only cover an agent that does not announce (another version).
const announcedRetryInterval = 100 * time.Millisecond

// readyListener is a machine whose guest can connect to the host: a booting agent connects to
// agentv1.ReadyPort once its API listens.
type readyListener interface {
	ListenVsock(port uint32) (net.Listener, error)
}

// Options tune how the sandbox talks to its agent.
type Options struct {
	// DialTimeout bounds the wait from VM start until the agent answers.
	DialTimeout time.Duration
	// RequestTimeout bounds each agent request (not the waits for a process's exit): one interceptor on every
	// client of the sandbox sets it.
	RequestTimeout time.Duration
	// HostVersion is the version of the Kiln binary starting the sandbox; a guest agent of another version is
	// reported (logged as a warning), since the host and guest speak an API that may differ between versions.
	HostVersion string
	// ShutdownTimeout bounds the agent's answer to Shutdown, and then the wait for the guest to power off.
	ShutdownTimeout time.Duration
	// RedialInterval is how long the host waits, after a refused dial, for a booting agent's announcement
	// (agentv1.ReadyPort) before it dials again; zero means 100 ms. A machine whose guest cannot connect to the
	// host is dialled every 5 ms instead.
	RedialInterval time.Duration
	Log            *logrus.Entry
}

// Sandbox is a booted microVM with a connected agent.
type Sandbox struct {
	m      vm.Machine
	opts   Options
	conn   net.Conn
	client *ttrpc.Client
	health agentv1.HealthService
	agent  agentv1.AgentService
	ctrs   agentv1.ContainersClient
	net    agentv1.NetworkService

	// announced: the agent announced that it listens before it answered (see Announced).
	announced bool

	streamsMu sync.Mutex
	streams   []*ttrpc.Client // extra connections for long-lived streams; closed first on Stop

	// hungUp is closed when the agent connection ends while the sandbox is not stopping (HungUp).
	hungUp   chan struct{}
	hangOnce sync.Once
	stopping atomic.Bool
	// Version is the agent's version as reported at the health check.
	AgentVersion string
}

// Start boots m and waits for its agent. On error the machine has been stopped and its resources released.
func Start(ctx context.Context, m vm.Machine, opts Options) (*Sandbox, error) {
	if opts.Log == nil {
		opts.Log = logrus.NewEntry(logrus.StandardLogger())
	}
	if opts.DialTimeout <= 0 {
		opts.DialTimeout = 60 * time.Second
	}
	if opts.RequestTimeout <= 0 {
		opts.RequestTimeout = 30 * time.Second
	}
	if opts.ShutdownTimeout <= 0 {
		opts.ShutdownTimeout = 3 * time.Second
	}
	if opts.RedialInterval <= 0 {
		opts.RedialInterval = announcedRetryInterval
	}
	if err := m.Start(ctx); err != nil {
		return nil, err
	}
	s := &Sandbox{m: m, opts: opts, hungUp: make(chan struct{})}
	err := s.connect(ctx)
	if r, ok := m.(bootInsteader); ok && err != nil && ctx.Err() == nil && r.Restored() {
		// A fault of the fast path (a template whose guest dies or hangs once restored) costs a cold boot.
		opts.Log.WithError(err).Warn("the VM restored from its template did not come up; booting it")
		if err = r.BootInstead(ctx, err); err == nil {
			err = s.connect(ctx)
		}
	}
	if err != nil {
		_ = m.Stop(context.WithoutCancel(ctx))
		return nil, fmt.Errorf("start sandbox %s: %w", m.ID(), err)
	}
	return s, nil
}

// bootInsteader is a VM that can boot in place of a restore whose guest did not come up (qemu.Machine).
type bootInsteader interface {
	Restored() bool
	BootInstead(ctx context.Context, why error) error
}

// connect dials the agent until it answers a health check, the VM exits, or DialTimeout passes.
func (s *Sandbox) connect(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, s.opts.DialTimeout)
	defer cancel()
	var lastErr error
	// A connection made while the guest boots can be lost on the way without an error; each attempt's health
	// check is bounded, starting short and growing to the request timeout, so one lost connection costs a
	// second, not the whole dial timeout, while a slow agent still gets its time.
	attempt := firstHealthTimeout
	announced, retry, stopListening := s.listenReady()
	defer stopListening()
	dials, announcements := 0, 0
	for {
		dials++
		conn, err := s.m.DialVsock(ctx, AgentPort)
		if err == nil {
			ended := make(chan struct{}) // closed once the connection ends, for whatever reason
			client := newClient(conn, s.opts.RequestTimeout, ttrpc.WithOnClose(func() { close(ended) }))
			health := agentv1.NewHealthClient(client)
			hctx, hcancel := context.WithTimeout(ctx, attempt)
			resp, herr := health.Check(hctx, &agentv1.CheckRequest{})
			hcancel()
			attempt = min(2*attempt, s.opts.RequestTimeout)
			if herr == nil && resp.GetStatus() == agentv1.CheckResponse_SERVING {
				s.conn, s.client, s.health = conn, client, health
				s.agent = agentv1.NewAgentClient(client)
				s.ctrs = guestStreams{agentv1.NewContainersClient(client)}
				s.net = agentv1.NewNetworkClient(client)
				s.AgentVersion = resp.GetAgentVersion()
				if w := VersionMismatch(s.opts.HostVersion, s.AgentVersion); w != "" {
					s.opts.Log.Warn(w)
				}
				if err := s.seed(ctx); err != nil {
					_ = client.Close()
					return err
				}
				go func() {
					<-ended
					s.hangUp()
				}()
				s.announced = announcements > 0
				s.opts.Log.WithFields(logrus.Fields{"dials": dials, "announced": announcements}).Debug("agent answered")
				return nil
			}
			_ = client.Close()
			if herr == nil {
				herr = fmt.Errorf("agent status %s", resp.GetStatus())
			}
			err = fmt.Errorf("agent health check: %w", herr)
		}
		lastErr = err
		select {
		case <-s.m.Exited():
			return fmt.Errorf("VM exited before its agent answered: %w", s.m.ExitError())
		case <-ctx.Done():
			if errors.Is(ctx.Err(), context.DeadlineExceeded) {
				return fmt.Errorf("agent did not answer on vsock port %d within %s (last error: %v); check the guest console%s",
					AgentPort, s.opts.DialTimeout, lastErr, s.m.Diagnostics())
			}
			return fmt.Errorf("wait for agent: %w", ctx.Err())
		case <-announced:
			announcements++
		case <-time.After(retry):
		}
	}
}

// listenReady returns a channel that receives when the guest's agent announces that it listens, the retry
// interval to use beside it, and what stops listening (which removes the listener's socket). A machine without
// readyListener, or whose listener fails, gets a channel that never receives and dialRetryInterval.
func (s *Sandbox) listenReady() (<-chan struct{}, time.Duration, func()) {
	rl, ok := s.m.(readyListener)
	if !ok {
		return nil, dialRetryInterval, func() {}
	}
	l, err := rl.ListenVsock(agentv1.ReadyPort)
	if err != nil {
		s.opts.Log.WithError(err).Debug("polling for the agent instead of waiting for its announcement")
		return nil, dialRetryInterval, func() {}
	}
	announced := make(chan struct{}, 1)
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			_ = c.Close()
			select {
			case announced <- struct{}{}:
			default:
			}
		}
	}()
	return announced, s.opts.RedialInterval, func() { _ = l.Close() }
}

// Announced says whether the agent announced that it listens (agentv1.ReadyPort) before it answered: a booting
// guest's agent does, with Kiln's own vsock device; a restored clone's already listens and is answered at once.
func (s *Sandbox) Announced() bool { return s.announced }

// seed gives the guest fresh entropy and the host's wall clock before anything else runs there (see
// agentv1.SeedGuestRequest).
func (s *Sandbox) seed(ctx context.Context) error {
	entropy := make([]byte, seedEntropy)
	if _, err := rand.Read(entropy); err != nil {
		return fmt.Errorf("seed guest: read host randomness: %w", err)
	}
	if _, err := s.agent.SeedGuest(ctx, &agentv1.SeedGuestRequest{Entropy: entropy, WallClockUnixNano: time.Now().UnixNano()}); err != nil {
		return fmt.Errorf("seed guest: %w", err)
	}
	return nil
}

// Reseed gives a running guest fresh entropy and the host's wall clock again, as seed did at its start: a spare's
// guest may have waited hours for its pod, and the host's clock may have been stepped meanwhile (a host that boots
// sets its clock from the network after containerd has started its spares), which the guest's clock does not
// follow.
func (s *Sandbox) Reseed(ctx context.Context) error {
	if err := s.seed(ctx); err != nil {
		return fmt.Errorf("vm %s: %w", s.m.ID(), err)
	}
	return nil
}

// seedEntropy is how many random bytes the guest gets at start: 512 bits, twice what its generator needs.
const seedEntropy = 64

// Machine is the sandbox's VM.
func (s *Sandbox) Machine() vm.Machine { return s.m }

// HungUp is closed when the agent connection ended while the sandbox was not stopping: the VM exited, the agent
// hung up, or the guest stopped taking requests (a write to it ran past the request timeout, which closes the
// connection). No request can reach the agent any more.
func (s *Sandbox) HungUp() <-chan struct{} { return s.hungUp }

// hangUp closes hungUp unless Stop closes the connection.
func (s *Sandbox) hangUp() {
	if !s.stopping.Load() {
		s.hangOnce.Do(func() { close(s.hungUp) })
	}
}

// Containers is the agent's container API over the sandbox's agent connection. It stays usable until Stop.
func (s *Sandbox) Containers() agentv1.ContainersClient { return s.ctrs }

// StreamClient opens an extra agent connection for a long-lived stream such as the container Events. The agent's
// shutdown waits until its connections are idle, and a stream that never ends keeps its connection busy; on a
// connection of its own it can be cut before the shutdown request, which Stop does.
func (s *Sandbox) StreamClient(ctx context.Context) (agentv1.ContainersClient, error) {
	conn, err := s.m.DialVsock(ctx, AgentPort)
	if err != nil {
		return nil, fmt.Errorf("open stream connection to agent of vm %s: %w", s.m.ID(), err)
	}
	client := newClient(conn, s.opts.RequestTimeout)
	s.streamsMu.Lock()
	s.streams = append(s.streams, client)
	s.streamsMu.Unlock()
	return guestStreams{agentv1.NewContainersClient(client)}, nil
}

// Agent is the agent's own service: the guest's description, its seeding, its clock (runtime/guestclock).
func (s *Sandbox) Agent() agentv1.AgentService { return s.agent }

// Network is the agent's network service.
func (s *Sandbox) Network() agentv1.NetworkService { return s.net }

// GuestInfo asks the agent to describe the guest.
func (s *Sandbox) GuestInfo(ctx context.Context) (*agentv1.GuestInfo, error) {
	info, err := s.agent.GuestInfo(ctx, &agentv1.GuestInfoRequest{})
	if err != nil {
		return nil, fmt.Errorf("guest info from agent of vm %s: %w", s.m.ID(), err)
	}
	return info, nil
}

// Check asks the agent whether it serves, within timeout: a VM that ended, or a guest that does not answer, is
// the error.
func (s *Sandbox) Check(ctx context.Context, timeout time.Duration) error {
	select {
	case <-s.m.Exited():
		return fmt.Errorf("vm %s ended: %v", s.m.ID(), s.m.ExitError())
	default:
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var resp *agentv1.CheckResponse
	err := bounded(ctx, func() (err error) {
		resp, err = s.health.Check(ctx, &agentv1.CheckRequest{})
		return err
	})
	if err != nil {
		return fmt.Errorf("health check of the agent of vm %s: %w", s.m.ID(), err)
	}
	if resp.GetStatus() != agentv1.CheckResponse_SERVING {
		return fmt.Errorf("the agent of vm %s is %s", s.m.ID(), resp.GetStatus())
	}
	return nil
}

// Stop shuts the guest down gracefully: the agent powers it off; if the VM has not exited within
// ShutdownTimeout the VMM is stopped (QMP quit, then kill). All host resources are released on return.
func (s *Sandbox) Stop(ctx context.Context) error {
	s.stopping.Store(true)
	s.streamsMu.Lock()
	for _, c := range s.streams {
		_ = c.Close()
	}
	s.streams = nil
	s.streamsMu.Unlock()
	select {
	case <-s.m.Exited():
	default:
		// A healthy agent answers at once; one that hung must not hold the stop for a whole request timeout.
		sctx, cancel := context.WithTimeout(ctx, s.opts.ShutdownTimeout)
		err := bounded(sctx, func() error {
			_, err := s.agent.Shutdown(sctx, &agentv1.ShutdownRequest{Reason: "sandbox stop"})
			return err
		})
		cancel()
		// Hanging up tells the agent its reply has arrived: it powers off then instead of after a grace period.
		_ = s.client.Close()
		if err != nil {
			// No answer: a hung agent powers nothing off, and waiting for it only kept the stop past containerd's
			// 3 s for a Shutdown. A guest that powered off before its answer came is stopped all the same.
			s.opts.Log.WithError(err).Debug("agent shutdown request; stopping the VM")
		} else {
			t := time.NewTimer(s.opts.ShutdownTimeout)
			select {
			case <-s.m.Exited():
			case <-t.C:
				s.opts.Log.Warn("guest did not power off in time; stopping the VM")
			case <-ctx.Done():
			}
			t.Stop()
		}
	}
	_ = s.client.Close()
	if err := s.m.Stop(ctx); err != nil {
		return fmt.Errorf("stop sandbox %s: %w", s.m.ID(), err)
	}
	return s.m.Wait(ctx)
}

// VersionMismatch describes a host and guest agent of different versions, or returns "" when they match or the
// host version is unknown.
func VersionMismatch(host, agent string) string {
	if host == "" || host == agent {
		return ""
	}
	return fmt.Sprintf("guest agent version %s differs from host Kiln version %s: rebuild the guest image (make image) or reinstall Kiln (make install)", agent, host)
}

// OptionsFrom takes the agent and stop timeouts from Kiln's configuration.
func OptionsFrom(cfg config.Config, hostVersion string, log *logrus.Entry) Options {
	return Options{
		HostVersion:     hostVersion,
		DialTimeout:     cfg.Agent.DialTimeout.Std(),
		RequestTimeout:  cfg.Agent.RequestTimeout.Std(),
		ShutdownTimeout: cfg.Hypervisor.StopTimeout.Std(),
		Log:             log,
	}
}
