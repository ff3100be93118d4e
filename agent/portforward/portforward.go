// Package portforward is the guest end of CRI port forwarding: it accepts the host's port-forward connections on
// vsock port 1026, reads each one's request (the port), dials that port on the pod's loopback and relays the
// stream both ways (framing in proto/agent/v1/portforward.go).
//
// It owns the limits on those connections (how many at once, how long a request or a dial may take). It must not
// know about network namespaces (its dialer does) or about containers.
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

	"github.com/kiln-runtime/kiln/agent/accept"
	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
)

// Port is the vsock port the host opens port-forward connections to.
const Port = agentv1.PortForwardPort

// SocketBuffer is the vsock socket buffer of port-forward connections, and so the window of data in flight each
// way (Linux caps a vsock socket's send window at its buffer, 256 KiB by default; the host's vsock device offers
// as much to the guest). It bounds what a connection holds in the guest's kernel when its reader is slow.
const SocketBuffer = 1 << 20

// Dialer reaches a port on the pod's loopback; agent/network's Pod is one.
type Dialer interface {
	DialLoopback(ctx context.Context, port uint16) (net.Conn, error)
}

// Config bounds a Server; zero fields take the defaults.
type Config struct {
	// MaxConns bounds the connections being served at once; more are closed at once.
	MaxConns int
	// RequestTimeout bounds the wait for a new connection's request line.
	RequestTimeout time.Duration
	// DialTimeout bounds the dial of the pod's port.
	DialTimeout time.Duration
}

// Default bounds of a Server.
const (
	DefaultMaxConns       = 256
	DefaultRequestTimeout = 10 * time.Second
	DefaultDialTimeout    = 10 * time.Second
)

// Server serves port-forward connections.
type Server struct {
	cfg  Config
	dial Dialer
	log  *logrus.Entry

	slots chan struct{}
	// refused counts connections closed because MaxConns were being served.
	refused atomic.Uint64
}

// NewServer returns a server that reaches the pod's ports through dial.
func NewServer(log *logrus.Entry, dial Dialer, cfg Config) *Server {
	if cfg.MaxConns <= 0 {
		cfg.MaxConns = DefaultMaxConns
	}
	if cfg.RequestTimeout <= 0 {
		cfg.RequestTimeout = DefaultRequestTimeout
	}
	if cfg.DialTimeout <= 0 {
		cfg.DialTimeout = DefaultDialTimeout
	}
	return &Server{cfg: cfg, dial: dial, log: log, slots: make(chan struct{}, cfg.MaxConns)}
}

// Refused counts the connections closed unserved because the server was at its limit.
func (s *Server) Refused() uint64 { return s.refused.Load() }

// Serve accepts connections on l until ctx is done or l fails, and closes l when ctx is done. Connections being
// relayed are closed when ctx is done too; Serve returns once they have.
func (s *Server) Serve(ctx context.Context, l net.Listener) error {
	stop := context.AfterFunc(ctx, func() { l.Close() })
	defer stop()
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		c, err := accept.Next(ctx, l)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("accept port-forward connection on %s: %w", l.Addr(), err)
		}
		select {
		case s.slots <- struct{}{}:
		default:
			n := s.refused.Add(1)
			c.Close()
			s.log.WithFields(logrus.Fields{"limit": s.cfg.MaxConns, "refused": n}).Warn("port-forward connection refused: too many at once")
			continue
		}
		wg.Go(func() {
			defer func() { <-s.slots }()
			if err := s.serve(ctx, c); err != nil {
				s.log.WithError(err).Debug("port-forward connection")
			}
		})
	}
}

// serve handles one connection to its end.
func (s *Server) serve(ctx context.Context, c net.Conn) error {
	defer c.Close()
	stop := context.AfterFunc(ctx, func() { c.Close() })
	defer stop()
	_ = c.SetReadDeadline(time.Now().Add(s.cfg.RequestTimeout))
	port, err := agentv1.ReadPortForwardRequest(c)
	if err != nil {
		return err
	}
	_ = c.SetReadDeadline(time.Time{})
	dctx, cancel := context.WithTimeout(ctx, s.cfg.DialTimeout)
	target, err := s.dial.DialLoopback(dctx, port)
	cancel()
	if err != nil {
		if werr := agentv1.WritePortForwardReply(c, err); werr != nil {
			err = errors.Join(err, werr)
		}
		return err
	}
	defer target.Close()
	stopTarget := context.AfterFunc(ctx, func() { target.Close() })
	defer stopTarget()
	if err := agentv1.WritePortForwardReply(c, nil); err != nil {
		return err
	}
	return agentv1.RelayPortForward(c, target)
}
