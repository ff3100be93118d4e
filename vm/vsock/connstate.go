package vsock

import "fmt"

// connState is where a connection is in its lifecycle. Shutdown is tracked by flags beside the state, since
// each direction closes on its own; the state only says whether data may flow at all.
type connState int

const (
	stateConnecting  connState = iota // host-initiated: REQUEST to the guest queued or sent, awaiting RESPONSE
	stateDialing                      // guest-initiated: dialing the host Unix socket before answering
	stateEstablished                  // data flows (each direction until its SHUTDOWN)
	stateClosing                      // the guest shut both directions: draining its data to the host, then RST
	stateClosed                       // forgotten by the muxer; nothing more is sent
)

func (s connState) String() string {
	switch s {
	case stateConnecting:
		return "connecting"
	case stateDialing:
		return "dialing"
	case stateEstablished:
		return "established"
	case stateClosing:
		return "closing"
	case stateClosed:
		return "closed"
	}
	return fmt.Sprintf("state(%d)", int(s))
}

// allowed is the transition table: anything it does not list is a bug the code reports.
// Closing a connection (close) is allowed from every state and does not go through it.
func allowed(from, to connState) bool {
	switch from {
	case stateConnecting, stateDialing:
		return to == stateEstablished || to == stateClosed
	case stateEstablished:
		return to == stateClosing || to == stateClosed
	case stateClosing:
		return to == stateClosed
	}
	return false
}

func (c *conn) transitionLocked(to connState) error {
	if allowed(c.state, to) {
		c.state = to
		return nil
	}
	return fmt.Errorf("vsock connection %s: cannot go from %s to %s", c.key, c.state, to)
}
