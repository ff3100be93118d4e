package vhostuser

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// request is a vhost-user front-end message type (QEMU docs/interop/vhost-user.rst, "Front-end message types").
type request uint32

const (
	reqGetFeatures         request = 1
	reqSetFeatures         request = 2
	reqSetOwner            request = 3
	reqResetOwner          request = 4
	reqSetMemTable         request = 5
	reqSetLogBase          request = 6
	reqSetLogFD            request = 7
	reqSetVringNum         request = 8
	reqSetVringAddr        request = 9
	reqSetVringBase        request = 10
	reqGetVringBase        request = 11
	reqSetVringKick        request = 12
	reqSetVringCall        request = 13
	reqSetVringErr         request = 14
	reqGetProtocolFeatures request = 15
	reqSetProtocolFeatures request = 16
	reqGetQueueNum         request = 17
	reqSetVringEnable      request = 18
	reqGetConfig           request = 24
	reqSetConfig           request = 25
	reqGetMaxMemSlots      request = 36
)

func (r request) String() string {
	switch r {
	case reqGetFeatures:
		return "GET_FEATURES"
	case reqSetFeatures:
		return "SET_FEATURES"
	case reqSetOwner:
		return "SET_OWNER"
	case reqResetOwner:
		return "RESET_OWNER"
	case reqSetMemTable:
		return "SET_MEM_TABLE"
	case reqSetLogBase:
		return "SET_LOG_BASE"
	case reqSetLogFD:
		return "SET_LOG_FD"
	case reqSetVringNum:
		return "SET_VRING_NUM"
	case reqSetVringAddr:
		return "SET_VRING_ADDR"
	case reqSetVringBase:
		return "SET_VRING_BASE"
	case reqGetVringBase:
		return "GET_VRING_BASE"
	case reqSetVringKick:
		return "SET_VRING_KICK"
	case reqSetVringCall:
		return "SET_VRING_CALL"
	case reqSetVringErr:
		return "SET_VRING_ERR"
	case reqGetProtocolFeatures:
		return "GET_PROTOCOL_FEATURES"
	case reqSetProtocolFeatures:
		return "SET_PROTOCOL_FEATURES"
	case reqGetQueueNum:
		return "GET_QUEUE_NUM"
	case reqSetVringEnable:
		return "SET_VRING_ENABLE"
	case reqGetConfig:
		return "GET_CONFIG"
	case reqSetConfig:
		return "SET_CONFIG"
	case reqGetMaxMemSlots:
		return "GET_MAX_MEM_SLOTS"
	}
	return fmt.Sprintf("request(%d)", uint32(r))
}

// Feature bits (GET_FEATURES) the backend itself adds to a device's.
const (
	// FeatureVersion1 is VIRTIO_F_VERSION_1; vhost-user backends never speak legacy virtio.
	FeatureVersion1 = uint64(1) << 32
	// FeatureProtocolFeatures is VHOST_USER_F_PROTOCOL_FEATURES.
	FeatureProtocolFeatures = uint64(1) << 30
	// FeatureRingIndirectDesc is VIRTIO_RING_F_INDIRECT_DESC, implemented by package virtqueue.
	FeatureRingIndirectDesc = uint64(1) << 28
	// FeatureRingEventIdx is VIRTIO_RING_F_EVENT_IDX, implemented by package virtqueue.
	FeatureRingEventIdx = uint64(1) << 29
)

// Protocol feature bits (GET_PROTOCOL_FEATURES).
const (
	protoFeatureReplyAck = uint64(1) << 3
	protoFeatureConfig   = uint64(1) << 9
	offeredProtoFeatures = protoFeatureReplyAck | protoFeatureConfig
)

// Header flags.
const (
	flagVersionMask = 0x3
	flagVersion     = 0x1
	flagReply       = 1 << 2
	flagNeedReply   = 1 << 3
)

const (
	headerSize = 12
	// maxPayload bounds what a message may carry; the largest message this backend accepts (SET_MEM_TABLE with
	// maxRegions regions) is 8+32*8 bytes, GET_CONFIG 12+256.
	maxPayload = 4096
	// maxRegions is VHOST_MEMORY_BASELINE_NREGIONS: the most regions (and fds) one SET_MEM_TABLE carries.
	maxRegions = 8
	// maxFDs is the most file descriptors accepted with one message.
	maxFDs = maxRegions
	// maxConfigSize is VHOST_USER_MAX_CONFIG_SIZE.
	maxConfigSize = 256
	// vringNoFD is VHOST_USER_VRING_NOFD_MASK in the u64 of SET_VRING_KICK/CALL/ERR; vringIndexMask selects
	// the ring index.
	vringNoFD      = uint64(1) << 8
	vringIndexMask = uint64(0xff)
)

// header is the 12-byte message header.
type header struct {
	req   request
	flags uint32
	size  uint32
}

var errShortPayload = errors.New("payload too short")

func decodeHeader(b []byte) (header, error) {
	if len(b) < headerSize {
		return header{}, fmt.Errorf("decode message header: %d bytes, want %d", len(b), headerSize)
	}
	h := header{
		req:   request(binary.LittleEndian.Uint32(b[0:])),
		flags: binary.LittleEndian.Uint32(b[4:]),
		size:  binary.LittleEndian.Uint32(b[8:]),
	}
	if h.flags&flagVersionMask != flagVersion {
		return h, fmt.Errorf("decode message header of %v: unsupported version %d", h.req, h.flags&flagVersionMask)
	}
	if h.size > maxPayload {
		return h, fmt.Errorf("decode message header of %v: payload size %d exceeds %d", h.req, h.size, maxPayload)
	}
	return h, nil
}

func encodeHeader(b []byte, h header) {
	binary.LittleEndian.PutUint32(b[0:], uint32(h.req))
	binary.LittleEndian.PutUint32(b[4:], h.flags)
	binary.LittleEndian.PutUint32(b[8:], h.size)
}

func decodeU64(p []byte) (uint64, error) {
	if len(p) < 8 {
		return 0, fmt.Errorf("decode u64: %w (%d bytes)", errShortPayload, len(p))
	}
	return binary.LittleEndian.Uint64(p), nil
}

// vringState is struct vhost_vring_state: a ring index and a number.
type vringState struct {
	index uint32
	num   uint32
}

func decodeVringState(p []byte) (vringState, error) {
	if len(p) < 8 {
		return vringState{}, fmt.Errorf("decode vring state: %w (%d bytes)", errShortPayload, len(p))
	}
	return vringState{index: binary.LittleEndian.Uint32(p[0:]), num: binary.LittleEndian.Uint32(p[4:])}, nil
}

func encodeVringState(s vringState) []byte {
	b := make([]byte, 8)
	binary.LittleEndian.PutUint32(b[0:], s.index)
	binary.LittleEndian.PutUint32(b[4:], s.num)
	return b
}

// vringAddr is struct vhost_vring_addr; addresses are frontend virtual addresses.
type vringAddr struct {
	index uint32
	flags uint32
	desc  uint64
	used  uint64
	avail uint64
	log   uint64
}

func decodeVringAddr(p []byte) (vringAddr, error) {
	if len(p) < 40 {
		return vringAddr{}, fmt.Errorf("decode vring address: %w (%d bytes)", errShortPayload, len(p))
	}
	return vringAddr{
		index: binary.LittleEndian.Uint32(p[0:]),
		flags: binary.LittleEndian.Uint32(p[4:]),
		desc:  binary.LittleEndian.Uint64(p[8:]),
		used:  binary.LittleEndian.Uint64(p[16:]),
		avail: binary.LittleEndian.Uint64(p[24:]),
		log:   binary.LittleEndian.Uint64(p[32:]),
	}, nil
}

// memRegion is one region of a memory table, without its fd.
type memRegion struct {
	guestAddr  uint64
	size       uint64
	userAddr   uint64
	mmapOffset uint64
}

func decodeMemTable(p []byte) ([]memRegion, error) {
	if len(p) < 8 {
		return nil, fmt.Errorf("decode memory table: %w (%d bytes)", errShortPayload, len(p))
	}
	n := binary.LittleEndian.Uint32(p[0:])
	if n == 0 || n > maxRegions {
		return nil, fmt.Errorf("decode memory table: %d regions, want 1 to %d", n, maxRegions)
	}
	if uint64(len(p)) < 8+32*uint64(n) {
		return nil, fmt.Errorf("decode memory table of %d regions: %w (%d bytes)", n, errShortPayload, len(p))
	}
	regions := make([]memRegion, n)
	for i := range regions {
		b := p[8+32*i:]
		regions[i] = memRegion{
			guestAddr:  binary.LittleEndian.Uint64(b[0:]),
			size:       binary.LittleEndian.Uint64(b[8:]),
			userAddr:   binary.LittleEndian.Uint64(b[16:]),
			mmapOffset: binary.LittleEndian.Uint64(b[24:]),
		}
	}
	return regions, nil
}

// configSpace is the GET_CONFIG/SET_CONFIG payload: a window into the device configuration space.
type configSpace struct {
	offset uint32
	size   uint32
	flags  uint32
	data   []byte
}

func decodeConfig(p []byte) (configSpace, error) {
	if len(p) < 12 {
		return configSpace{}, fmt.Errorf("decode config: %w (%d bytes)", errShortPayload, len(p))
	}
	c := configSpace{
		offset: binary.LittleEndian.Uint32(p[0:]),
		size:   binary.LittleEndian.Uint32(p[4:]),
		flags:  binary.LittleEndian.Uint32(p[8:]),
	}
	if c.size > maxConfigSize || c.offset > maxConfigSize-c.size {
		return c, fmt.Errorf("decode config: window offset %d size %d exceeds %d bytes", c.offset, c.size, maxConfigSize)
	}
	if uint32(len(p)-12) < c.size {
		return c, fmt.Errorf("decode config of %d bytes: %w (%d bytes)", c.size, errShortPayload, len(p))
	}
	c.data = p[12 : 12+c.size]
	return c, nil
}

func encodeConfig(c configSpace) []byte {
	b := make([]byte, 12+len(c.data))
	binary.LittleEndian.PutUint32(b[0:], c.offset)
	binary.LittleEndian.PutUint32(b[4:], uint32(len(c.data)))
	binary.LittleEndian.PutUint32(b[8:], c.flags)
	copy(b[12:], c.data)
	return b
}

func encodeU64(v uint64) []byte {
	b := make([]byte, 8)
	binary.LittleEndian.PutUint64(b, v)
	return b
}
