package vhostuser

import (
	"fmt"

	"golang.org/x/sys/unix"

	"github.com/kiln-runtime/kiln/vm/guestmem"
	"github.com/kiln-runtime/kiln/vm/virtqueue"
)

// vring is what the frontend told the backend about one ring. Its fds are owned here; queues get duplicates.
type vring struct {
	num     uint16 // 0 until SET_VRING_NUM
	base    uint16 // next available index to consume when the ring (re)starts
	addr    vringAddr
	hasAddr bool
	kick    int // -1 when none
	call    int // -1 when none
	callSet bool
	errFD   int
	enabled bool
}

func newVring() *vring { return &vring{kick: -1, call: -1, errFD: -1} }

// ready says whether the ring can run: "enabled" is SET_VRING_ENABLE's, or implied when
// VHOST_USER_F_PROTOCOL_FEATURES was not negotiated.
func (r *vring) ready(enabledByDefault bool) bool {
	return r.num != 0 && r.hasAddr && r.kick >= 0 && r.callSet && (r.enabled || enabledByDefault)
}

func setFD(slot *int, fd int) {
	if *slot >= 0 {
		unix.Close(*slot)
	}
	*slot = fd
}

// reset forgets everything but the ring's position, closing its fds.
func (r *vring) closeFDs() {
	setFD(&r.kick, -1)
	setFD(&r.call, -1)
	setFD(&r.errFD, -1)
	r.callSet = false
}

// queueConfig translates the ring's frontend addresses into guest addresses for a virtqueue.
func (r *vring) queueConfig(mem *guestmem.Memory, eventIdx bool) (virtqueue.Config, error) {
	cfg := virtqueue.Config{Size: r.num, EventIdx: eventIdx, LastAvail: r.base, KickFD: r.kick, CallFD: r.call}
	var err error
	if cfg.DescAddr, err = mem.GuestAddrFromUser(r.addr.desc); err != nil {
		return cfg, fmt.Errorf("descriptor table: %w", err)
	}
	if cfg.AvailAddr, err = mem.GuestAddrFromUser(r.addr.avail); err != nil {
		return cfg, fmt.Errorf("available ring: %w", err)
	}
	if cfg.UsedAddr, err = mem.GuestAddrFromUser(r.addr.used); err != nil {
		return cfg, fmt.Errorf("used ring: %w", err)
	}
	return cfg, nil
}

// maybeStart starts the device when memory is mapped and every ring is ready.
func (s *session) maybeStart() error {
	if s.queues != nil || s.mem == nil {
		return nil
	}
	byDefault := s.acked&FeatureProtocolFeatures == 0
	for _, r := range s.rings {
		if !r.ready(byDefault) {
			return nil
		}
	}
	for i, q := range s.stopped {
		if q.Held() {
			return fmt.Errorf("start vring %d: the front end holds a write to its last call eventfd (a blocking eventfd with a full counter it does not read)", i)
		}
	}
	s.stopped = nil
	eventIdx := s.acked&FeatureRingEventIdx != 0
	queues := make([]*virtqueue.Queue, 0, len(s.rings))
	closeAll := func() {
		for _, q := range queues {
			q.Close()
		}
	}
	for i, r := range s.rings {
		cfg, err := r.queueConfig(s.mem, eventIdx)
		if err == nil {
			var q *virtqueue.Queue
			if q, err = virtqueue.New(s.mem, cfg); err == nil {
				queues = append(queues, q)
				continue
			}
		}
		closeAll()
		return fmt.Errorf("start vring %d: %w", i, err)
	}
	if err := s.dev.Start(queues); err != nil {
		closeAll()
		return fmt.Errorf("start device with %d queues: %w", len(queues), err)
	}
	s.queues = queues
	s.log.WithField("event_idx", eventIdx).Debug("vhost-user device started")
	return nil
}

// stopDevice stops a running device and remembers where each ring stopped. Kicks stop before Device.Stop so a
// device waiting on Kicks() sees the channel close; call fds stay until the device is done so its last
// completions still interrupt the driver.
func (s *session) stopDevice() {
	if s.queues == nil {
		return
	}
	for _, q := range s.queues {
		q.Stop()
	}
	s.dev.Stop()
	for i, q := range s.queues {
		s.rings[i].base = q.LastAvail()
		q.Close()
	}
	s.stopped, s.queues = s.queues, nil
	s.log.Debug("vhost-user device stopped")
}
