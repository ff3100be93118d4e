package vhostuser

import (
	"errors"
	"fmt"
	"io"
	"strings"

	"github.com/sirupsen/logrus"

	"github.com/kiln-runtime/kiln/vm/guestmem"
	"github.com/kiln-runtime/kiln/vm/virtqueue"
)

// session is the backend state of one frontend connection. It is used from one goroutine.
type session struct {
	dev Device
	w   io.Writer
	log *logrus.Entry

	offered    uint64 // GET_FEATURES answer
	acked      uint64 // SET_FEATURES
	protoAcked uint64 // SET_PROTOCOL_FEATURES
	mem        *guestmem.Memory
	ram        GuestRAM // bounds mem and every mapping of it
	rings      []*vring
	queues     []*virtqueue.Queue // non-nil while the device runs
	// stopped are the queues of the device's last run: one whose call eventfd write is still held (the front end
	// filled a blocking eventfd's counter) refuses the next start, so that restarts cannot leave a goroutine held
	// in a write each.
	stopped []*virtqueue.Queue
}

func newSession(dev Device, ram GuestRAM, w io.Writer, log *logrus.Entry) *session {
	s := &session{dev: dev, ram: ram, w: w, log: log,
		offered: dev.Features() | FeatureVersion1 | FeatureProtocolFeatures | RingFeatures}
	for range dev.NumQueues() {
		s.rings = append(s.rings, newVring())
	}
	return s
}

// close stops the device and releases memory and fds; the connection is gone.
func (s *session) close() {
	s.stopDevice()
	for _, r := range s.rings {
		r.closeFDs()
	}
	s.unmap()
}

func (s *session) unmap() {
	if s.mem == nil {
		return
	}
	if err := s.mem.Close(); err != nil {
		s.log.WithError(err).Warn("unmap guest memory")
	}
	s.mem = nil
}

// errUnsupported marks requests this backend does not implement.
var errUnsupported = errors.New("unsupported vhost-user request")

// hasReply lists requests whose answer is a reply of their own rather than a REPLY_ACK status.
func hasReply(r request) bool {
	switch r {
	case reqGetFeatures, reqGetProtocolFeatures, reqGetVringBase, reqGetQueueNum, reqGetConfig, reqGetMaxMemSlots:
		return true
	}
	return false
}

// handle serves one message. Only errors that leave the connection unusable are returned: a failed request the
// frontend asked an acknowledgement for is answered with a non-zero status, other failures are logged.
func (s *session) handle(m *message) error {
	log := s.log.WithField("request", m.req.String())
	log.Trace("vhost-user request")
	reply, err := s.dispatch(m)
	if err == nil {
		err = s.maybeStart()
	}
	if hasReply(m.req) {
		if err != nil {
			// The frontend waits for an answer we cannot give.
			return fmt.Errorf("handle %v: %w", m.req, err)
		}
		return writeReply(s.w, m.req, reply)
	}
	if err != nil {
		if m.needReply() {
			log.WithError(err).Warn("vhost-user request failed")
			return writeReply(s.w, m.req, encodeU64(1))
		}
		if errors.Is(err, errUnsupported) {
			// Without an acknowledgement to carry the refusal, carrying on would leave the frontend believing
			// the backend did what it asked.
			return fmt.Errorf("handle %v: %w", m.req, err)
		}
		log.WithError(err).Warn("vhost-user request failed")
		return nil
	}
	if m.needReply() {
		return writeReply(s.w, m.req, encodeU64(0))
	}
	return nil
}

// dispatch applies one request; reply is only used for requests with a reply of their own.
func (s *session) dispatch(m *message) (reply []byte, err error) {
	switch m.req {
	case reqGetFeatures:
		return encodeU64(s.offered), nil
	case reqSetFeatures:
		return nil, s.setFeatures(m.payload)
	case reqGetProtocolFeatures:
		return encodeU64(offeredProtoFeatures), nil
	case reqSetProtocolFeatures:
		v, err := decodeU64(m.payload)
		if err != nil {
			return nil, err
		}
		if v&^offeredProtoFeatures != 0 {
			return nil, fmt.Errorf("protocol features %#x were not offered (%#x)", v, offeredProtoFeatures)
		}
		s.protoAcked = v
		return nil, nil
	case reqSetOwner:
		return nil, nil
	case reqResetOwner:
		// Deprecated; the protocol recommends treating it as "stop all rings" rather than dropping state.
		s.stopDevice()
		for _, r := range s.rings {
			r.enabled = false
			setFD(&r.kick, -1)
		}
		return nil, nil
	case reqSetMemTable:
		return nil, s.setMemTable(m)
	case reqGetQueueNum:
		return encodeU64(uint64(len(s.rings))), nil
	case reqGetMaxMemSlots:
		return encodeU64(maxRegions), nil
	case reqGetConfig:
		return s.getConfig(m.payload), nil
	case reqSetConfig:
		return nil, s.setConfig(m.payload)
	case reqSetVringNum, reqSetVringAddr, reqSetVringBase, reqGetVringBase, reqSetVringKick, reqSetVringCall,
		reqSetVringErr, reqSetVringEnable:
		return s.vringRequest(m)
	}
	return nil, fmt.Errorf("%w %v with %d payload bytes", errUnsupported, m.req, m.size)
}

func (s *session) setFeatures(p []byte) error {
	v, err := decodeU64(p)
	if err != nil {
		return err
	}
	if v&^s.offered != 0 {
		return fmt.Errorf("features %#x were not offered (%#x)", v, s.offered)
	}
	// Ring behaviour depends on the features: rebuild running queues with the new ones.
	if v != s.acked {
		s.stopDevice()
	}
	s.acked = v
	s.log.WithField("features", fmt.Sprintf("%#x", v)).Debug("features negotiated")
	return nil
}

func (s *session) setMemTable(m *message) error {
	regions, err := decodeMemTable(m.payload)
	if err != nil {
		return err
	}
	if len(m.fds) != len(regions) {
		return fmt.Errorf("memory table has %d regions but %d file descriptors", len(regions), len(m.fds))
	}
	if s.ram.Bytes > 0 {
		var total uint64
		for _, r := range regions {
			// Regions are checked for overflow one by one (guestmem.Map); their sum is not.
			if total+r.size < total || total+r.size > s.ram.Bytes {
				return fmt.Errorf("memory table holds more than the VM's %d bytes of memory", s.ram.Bytes)
			}
			total += r.size
		}
	}
	grs := make([]guestmem.Region, len(regions))
	for i, r := range regions {
		grs[i] = guestmem.Region{GuestPhysAddr: r.guestAddr, Size: r.size, UserAddr: r.userAddr,
			MmapOffset: r.mmapOffset, FD: m.fds[i]}
		m.fds[i] = -1 // Map owns it now
	}
	// The device must stop touching the old mapping before it goes away.
	s.stopDevice()
	s.unmap()
	mem, err := guestmem.Map(grs, s.ram.Grant)
	if err != nil {
		return fmt.Errorf("set memory table: %w", err)
	}
	s.mem = mem
	layout := make([]string, len(regions))
	for i, r := range regions {
		layout[i] = fmt.Sprintf("%#x+%#x", r.guestAddr, r.size)
	}
	s.log.WithField("regions", strings.Join(layout, " ")).Debug("guest memory mapped")
	return nil
}

// getConfig answers GET_CONFIG; on a malformed request it answers an empty payload, which the protocol defines
// as the failure reply.
func (s *session) getConfig(p []byte) []byte {
	c, err := decodeConfig(p)
	if err != nil {
		s.log.WithError(err).Warn("refuse GET_CONFIG")
		return []byte{}
	}
	space := s.dev.Config()
	c.data = make([]byte, c.size)
	if uint64(c.offset) < uint64(len(space)) {
		copy(c.data, space[c.offset:])
	}
	return encodeConfig(c)
}

func (s *session) setConfig(p []byte) error {
	c, err := decodeConfig(p)
	if err != nil {
		return err
	}
	w, ok := s.dev.(ConfigWriter)
	if !ok {
		return fmt.Errorf("set config at offset %d (%d bytes): configuration space is read-only", c.offset, c.size)
	}
	if err := w.SetConfig(c.offset, c.data); err != nil {
		return fmt.Errorf("set config at offset %d (%d bytes): %w", c.offset, c.size, err)
	}
	return nil
}
