package stdio

import (
	"context"
	"errors"
	"fmt"
	"net"
	"slices"
	"sync"
	"time"
)

// Hub holds parked stdio connections by key until they are claimed.
type Hub struct {
	cfg Config

	mu     sync.Mutex
	parked map[string]map[Stream]*parkedConn
	// changed is closed and replaced whenever a connection is parked, so that
	// claims waiting for their streams look again.
	changed chan struct{}
}

type parkedConn struct {
	conn  net.Conn
	timer *time.Timer
}

// NewHub returns an empty hub.
func NewHub(cfg Config) *Hub {
	if cfg.PreambleTimeout <= 0 {
		cfg.PreambleTimeout = DefaultPreambleTimeout
	}
	if cfg.ParkTimeout <= 0 {
		cfg.ParkTimeout = DefaultParkTimeout
	}
	return &Hub{cfg: cfg, parked: map[string]map[Stream]*parkedConn{}, changed: make(chan struct{})}
}

// Accept reads c's preamble and parks c. It closes c when the preamble is
// bad or late, or when the key already has that stream parked.
func (h *Hub) Accept(c net.Conn) error {
	_ = c.SetReadDeadline(time.Now().Add(h.cfg.PreambleTimeout))
	key, stream, err := ReadPreamble(c)
	if err != nil {
		c.Close()
		return err
	}
	_ = c.SetReadDeadline(time.Time{})
	return h.park(key, stream, c)
}

func (h *Hub) park(key string, stream Stream, c net.Conn) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	streams := h.parked[key]
	if streams == nil {
		streams = map[Stream]*parkedConn{}
		h.parked[key] = streams
	}
	if _, dup := streams[stream]; dup {
		c.Close()
		return fmt.Errorf("stdio key %q already has a %s connection", key, stream)
	}
	p := &parkedConn{conn: c}
	p.timer = time.AfterFunc(h.cfg.ParkTimeout, func() { h.expire(key, stream, p) })
	streams[stream] = p
	close(h.changed)
	h.changed = make(chan struct{})
	return nil
}

// expire closes a connection nobody claimed in time.
func (h *Hub) expire(key string, stream Stream, p *parkedConn) {
	h.mu.Lock()
	streams := h.parked[key]
	if streams == nil || streams[stream] != p {
		h.mu.Unlock()
		return
	}
	delete(streams, stream)
	if len(streams) == 0 {
		delete(h.parked, key)
	}
	h.mu.Unlock()
	p.conn.Close()
}

// Claim waits until every stream in want is parked under key, then takes
// them out of the hub and returns them; the caller owns them from then on.
// ctx bounds the wait: when it ends first, Claim takes nothing and says
// which streams never arrived.
func (h *Hub) Claim(ctx context.Context, key string, want []Stream) (map[Stream]net.Conn, error) {
	if key == "" {
		if len(want) == 0 {
			return map[Stream]net.Conn{}, nil
		}
		return nil, fmt.Errorf("streams %v requested without a stdio key", want)
	}
	for {
		h.mu.Lock()
		streams := h.parked[key]
		var missing []Stream
		for _, s := range want {
			if streams[s] == nil {
				missing = append(missing, s)
			}
		}
		if len(missing) == 0 {
			got := make(map[Stream]net.Conn, len(want))
			for _, s := range want {
				p := streams[s]
				p.timer.Stop()
				got[s] = p.conn
				delete(streams, s)
			}
			if len(streams) == 0 {
				delete(h.parked, key)
			}
			h.mu.Unlock()
			return got, nil
		}
		changed := h.changed
		h.mu.Unlock()
		select {
		case <-changed:
		case <-ctx.Done():
			slices.Sort(missing)
			err := ctx.Err()
			if errors.Is(err, context.DeadlineExceeded) {
				err = errors.New("timed out")
			}
			return nil, fmt.Errorf("wait for stdio key %q streams %v: %w", key, missing, err)
		}
	}
}

// Parked counts the connections waiting to be claimed.
func (h *Hub) Parked() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	n := 0
	for _, streams := range h.parked {
		n += len(streams)
	}
	return n
}
