// Package portforward makes CRI port forwarding (`crictl port-forward`, `kubectl port-forward`) reach a Kiln pod.
// containerd serves PortForward itself: it enters the pod's network namespace on the host and dials
// localhost:<port> there, where nothing listens, since the pod's processes run in the guest. This package attaches
// an eBPF sk_lookup program to that namespace which hands every TCP connection to 127.0.0.1 or ::1, on any port, to
// a listener the shim owns there; an accepted connection's local address is the one dialled, which names the port.
// Each one goes to the guest agent over a vsock connection of its own (proto/agent/v1/portforward.go), which dials
// the port on the loopback of the pod's namespace in the guest and relays the stream.
//
// It owns the program, its attachment and the listeners (all held by file descriptors, none pinned: they end with
// the shim), and the limits on what the guest answers. It must not know about containerd, containers or the VMM:
// it gets a namespace path and a way to reach the guest.
package portforward

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sirupsen/logrus"

	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
)

// Port is the guest agent's vsock port for port-forward connections.
const Port = agentv1.PortForwardPort

// Dialer opens a byte stream to a guest vsock port; vm.Machine is one.
type Dialer interface {
	DialVsock(ctx context.Context, port uint32) (net.Conn, error)
}

// Limits on one pod's forwarding.
const (
	// MaxConns bounds the streams forwarded at once; a connection beyond it is reset at once and counted.
	MaxConns = 256
	// replyTimeout bounds the wait for the agent's reply: it covers the vsock dial and the agent's own dial of the
	// port (10 s at most in the agent), so a guest that never answers cannot hold a connection.
	replyTimeout = 30 * time.Second
	// acceptRetry is the pause after a failed accept (EMFILE and the like) before the next.
	acceptRetry = 100 * time.Millisecond
)

// Forwarder serves port forwarding into one pod.
type Forwarder struct {
	log    *logrus.Entry
	dialer Dialer
	steer  *steering

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	slots  chan struct{}
	once   sync.Once

	// refused counts connections reset because MaxConns were being forwarded; failed those the guest did not
	// take (no reply, a bad one, or the port unreachable there).
	refused atomic.Uint64
	failed  atomic.Uint64
}

// Start steers connections to the loopback of the network namespace at nsPath to the guest behind d. On error
// nothing is left.
func Start(nsPath string, d Dialer, log *logrus.Entry) (*Forwarder, error) {
	s, err := steer(nsPath)
	if err != nil {
		return nil, fmt.Errorf("port forwarding in %s: %w", nsPath, err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	f := &Forwarder{log: log, dialer: d, steer: s, ctx: ctx, cancel: cancel, slots: make(chan struct{}, MaxConns)}
	for _, l := range s.listeners() {
		f.wg.Go(func() { f.accept(l) })
	}
	return f, nil
}

// Refused counts the connections reset because the pod had MaxConns forwarded streams.
func (f *Forwarder) Refused() uint64 { return f.refused.Load() }

// Failed counts the connections the guest did not take: the port unreachable there, or no valid reply in time.
func (f *Forwarder) Failed() uint64 { return f.failed.Load() }

func (f *Forwarder) accept(l *net.TCPListener) {
	for {
		c, err := l.AcceptTCP()
		if err != nil {
			if f.ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return
			}
			// Out of descriptors or memory, for a while: the pod keeps its forwarding once it passes.
			f.log.WithError(err).Warn("accept port-forward connection")
			select {
			case <-f.ctx.Done():
				return
			case <-time.After(acceptRetry):
			}
			continue
		}
		select {
		case f.slots <- struct{}{}:
		default:
			n := f.refused.Add(1)
			reset(c)
			f.log.WithFields(logrus.Fields{"limit": MaxConns, "refused": n}).Warn("port-forward connection refused: too many at once")
			continue
		}
		f.wg.Go(func() {
			defer func() { <-f.slots }()
			f.forward(c)
		})
	}
}

// forward carries one connection to the guest and back.
func (f *Forwarder) forward(c *net.TCPConn) {
	local, _ := c.LocalAddr().(*net.TCPAddr)
	if local == nil || local.Port <= 0 || local.Port > 65535 {
		reset(c)
		return
	}
	port := uint16(local.Port)
	log := f.log.WithField("port", port)
	guest, err := f.open(port)
	if err != nil {
		n := f.failed.Add(1)
		// A reset rather than an orderly close: containerd reports an error for the stream instead of an empty
		// answer.
		reset(c)
		l := log.WithError(err).WithField("failed", n)
		if errors.Is(err, agentv1.ErrPortForwardRefused) {
			l.Info("port forward: nothing answers on the port in the pod")
		} else {
			l.Warn("port forward")
		}
		return
	}
	defer guest.Close()
	defer c.Close()
	stop := context.AfterFunc(f.ctx, func() {
		c.Close()
		guest.Close()
	})
	defer stop()
	if err := agentv1.RelayPortForward(c, guest); err != nil {
		log.WithError(err).Debug("port forward relay")
	}
}

// open connects to the agent's port-forward port and asks for port; it returns the connection once the agent has
// reached the port.
func (f *Forwarder) open(port uint16) (conn net.Conn, retErr error) {
	ctx, cancel := context.WithTimeout(f.ctx, replyTimeout)
	defer cancel()
	g, err := f.dialer.DialVsock(ctx, Port)
	if err != nil {
		return nil, fmt.Errorf("dial agent port-forward port %d: %w", Port, err)
	}
	// The connection is closed when ctx ends first: a guest that never answers cannot hold it.
	stop := context.AfterFunc(ctx, func() { g.Close() })
	defer func() {
		if !stop() && retErr == nil {
			// ctx ended as the reply came: the connection is closed already.
			retErr = errors.New("closed")
		}
		if retErr != nil {
			conn = nil
			g.Close()
			if errors.Is(ctx.Err(), context.DeadlineExceeded) {
				retErr = fmt.Errorf("port %d: no answer from the guest within %s: %w", port, replyTimeout, retErr)
			}
		}
	}()
	if err := agentv1.WritePortForwardRequest(g, port); err != nil {
		return nil, err
	}
	if err := agentv1.ReadPortForwardReply(g); err != nil {
		return nil, err
	}
	return g, nil
}

// reset closes c with a TCP reset (SO_LINGER 0).
func reset(c *net.TCPConn) {
	_ = c.SetLinger(0)
	_ = c.Close()
}

// Close stops forwarding: the program is detached, the listeners closed, and the streams being forwarded cut. It
// returns once every stream has ended. It is safe to call more than once.
func (f *Forwarder) Close() error {
	f.once.Do(func() {
		f.cancel()
		f.steer.Close()
	})
	f.wg.Wait()
	return nil
}
