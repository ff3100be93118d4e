package vsock

import "sync/atomic"

// Metrics are the device's counters since it was created. As with Firecracker's device metrics, every packet,
// chain or connection the device gives up on because the guest misbehaved or starved it is counted, so a limit
// that bites shows without a log line per event.
type Metrics struct {
	// RstDropped counts RSTs not queued because maxCtl RSTs already waited for rx buffers the guest did not post.
	RstDropped uint64
	// MalformedTxChains and MalformedRxChains count descriptor chains the virtqueue refused (given back unused, unless
	// the head lies past the ring).
	MalformedTxChains uint64
	MalformedRxChains uint64
	// SmallRxChains counts rx chains too small for a packet header and payload (given back empty).
	SmallRxChains uint64
	// ConnsKilled counts connections reset on a timeout: the guest did not answer a host's connection request,
	// did not finish a close it started, or stayed silent after the host side was gone.
	ConnsKilled uint64
	// ConnsViolated counts connections reset because the guest broke the protocol on them: data beyond the
	// credit it was given, a packet its connection's state does not allow (logged at debug level only).
	ConnsViolated uint64
	// WarningsSuppressed counts warnings about the guest's rings left out of the log by rate limiting.
	WarningsSuppressed uint64
}

// counters are the live values behind Metrics; each is updated on its own, without a lock.
type counters struct {
	rstDropped         atomic.Uint64
	malformedTxChains  atomic.Uint64
	malformedRxChains  atomic.Uint64
	smallRxChains      atomic.Uint64
	connsKilled        atomic.Uint64
	connsViolated      atomic.Uint64
	warningsSuppressed atomic.Uint64

	fromGuest, toGuest atomic.Uint64 // packets, for Traffic
}

func (c *counters) snapshot() Metrics {
	return Metrics{
		RstDropped:         c.rstDropped.Load(),
		MalformedTxChains:  c.malformedTxChains.Load(),
		MalformedRxChains:  c.malformedRxChains.Load(),
		SmallRxChains:      c.smallRxChains.Load(),
		ConnsKilled:        c.connsKilled.Load(),
		ConnsViolated:      c.connsViolated.Load(),
		WarningsSuppressed: c.warningsSuppressed.Load(),
	}
}

// Traffic is how many packets the guest sent the device and how many the device gave it. Unlike Metrics it is
// no count of trouble; it tells a guest that never spoke from one that stopped answering.
type Traffic struct {
	FromGuest, ToGuest uint64
}

func (c *counters) traffic() Traffic {
	return Traffic{FromGuest: c.fromGuest.Load(), ToGuest: c.toGuest.Load()}
}
