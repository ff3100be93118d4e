package agent

import (
	"context"
	"net"
	"sync"
)

// openConns counts the agent API's open connections, so that a shutdown can wait for the host to hang up after
// the reply to its Shutdown request instead of waiting a fixed time for that reply to leave.
type openConns struct {
	mu   sync.Mutex
	open int
	// none is closed while no connection is open.
	none chan struct{}
}

func newOpenConns() *openConns {
	none := make(chan struct{})
	close(none)
	return &openConns{none: none}
}

func (o *openConns) opened() {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.open == 0 {
		o.none = make(chan struct{})
	}
	o.open++
}

func (o *openConns) closed() {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.open--
	if o.open == 0 {
		close(o.none)
	}
}

// waitNone returns once no connection is open, or with ctx's error.
func (o *openConns) waitNone(ctx context.Context) error {
	o.mu.Lock()
	none := o.none
	o.mu.Unlock()
	select {
	case <-none:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// countingListener counts the connections it accepts in conns until each is closed. ttrpc closes a connection
// when its peer hangs up, so the count falls when the host closes its end.
type countingListener struct {
	net.Listener
	conns *openConns
}

func (l countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	l.conns.opened()
	return &countedConn{Conn: c, conns: l.conns}, nil
}

type countedConn struct {
	net.Conn
	conns *openConns
	once  sync.Once
}

func (c *countedConn) Close() error {
	c.once.Do(c.conns.closed)
	return c.Conn.Close()
}
