// Package vsock is Kiln's virtio-vsock device backend (VIRTIO 1.2 §5.10), served to QEMU through vhost-user.
//
// It owns the vsock packet format, each connection's state machine and credit accounting, and the mapping of
// guest ports to host Unix sockets (the "hybrid vsock" convention: a host client connects to one Unix socket
// and writes "CONNECT <port>\n"; a guest connection to host port P is forwarded to "<path>_<P>").
// It must not know vhost-user messages or how virtqueues are laid out in guest memory: it sees descriptor
// chains as lists of byte slices, handed over by vm/virtqueue.
package vsock

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// HeaderSize is the size of struct virtio_vsock_hdr.
const HeaderSize = 44

// HostCID is the well-known context id of the host (VMADDR_CID_HOST); the device speaks for it.
const HostCID = 2

// maxPayload bounds one packet's payload. Linux never sends more than 64 KiB per packet
// (VIRTIO_VSOCK_MAX_PKT_BUF_SIZE); a larger len is treated as malformed rather than trusted.
const maxPayload = 64 * 1024

// Op is a vsock packet operation (virtio_vsock_hdr.op).
type Op uint16

// Packet operations, VIRTIO 1.2 §5.10.6.
const (
	OpInvalid       Op = 0
	OpRequest       Op = 1
	OpResponse      Op = 2
	OpRst           Op = 3
	OpShutdown      Op = 4
	OpRW            Op = 5
	OpCreditUpdate  Op = 6
	OpCreditRequest Op = 7
)

func (o Op) String() string {
	switch o {
	case OpRequest:
		return "REQUEST"
	case OpResponse:
		return "RESPONSE"
	case OpRst:
		return "RST"
	case OpShutdown:
		return "SHUTDOWN"
	case OpRW:
		return "RW"
	case OpCreditUpdate:
		return "CREDIT_UPDATE"
	case OpCreditRequest:
		return "CREDIT_REQUEST"
	}
	return fmt.Sprintf("op(%d)", uint16(o))
}

// TypeStream is the only socket type this device serves (VIRTIO_VSOCK_TYPE_STREAM).
const TypeStream uint16 = 1

// Shutdown flags carried by OpShutdown.
const (
	ShutdownRcv  uint32 = 1 // the sender will receive no more data
	ShutdownSend uint32 = 2 // the sender will send no more data
	shutdownBoth        = ShutdownRcv | ShutdownSend
)

// Header is struct virtio_vsock_hdr. All fields are little-endian on the wire.
type Header struct {
	SrcCID   uint64
	DstCID   uint64
	SrcPort  uint32
	DstPort  uint32
	Len      uint32 // payload bytes following the header
	Type     uint16
	Op       Op
	Flags    uint32
	BufAlloc uint32 // sender's receive buffer size for this connection
	FwdCnt   uint32 // bytes the sender has consumed from its receive buffer (free-running)
}

// Errors from decoding a driver-written packet. They are sentinels so the muxer can decide, by kind, whether
// the guest deserves a RST or the packet is silently dropped.
var (
	ErrShortHeader  = errors.New("vsock packet shorter than its 44-byte header")
	ErrTruncated    = errors.New("vsock packet len goes beyond the descriptor chain")
	ErrTooLarge     = errors.New("vsock packet payload larger than 64 KiB")
	ErrBadType      = errors.New("vsock packet socket type is not STREAM")
	ErrBadOp        = errors.New("vsock packet op is unknown")
	ErrBadSourceCID = errors.New("vsock packet source CID is not the guest's")
	ErrBadDestCID   = errors.New("vsock packet destination CID is not the host's")
)

// Encode writes h into b, which must hold at least HeaderSize bytes.
func (h *Header) Encode(b []byte) {
	_ = b[HeaderSize-1]
	le := binary.LittleEndian
	le.PutUint64(b[0:], h.SrcCID)
	le.PutUint64(b[8:], h.DstCID)
	le.PutUint32(b[16:], h.SrcPort)
	le.PutUint32(b[20:], h.DstPort)
	le.PutUint32(b[24:], h.Len)
	le.PutUint16(b[28:], h.Type)
	le.PutUint16(b[30:], uint16(h.Op))
	le.PutUint32(b[32:], h.Flags)
	le.PutUint32(b[36:], h.BufAlloc)
	le.PutUint32(b[40:], h.FwdCnt)
}

// DecodeHeader parses the first HeaderSize bytes of b without judging the values.
func DecodeHeader(b []byte) (Header, error) {
	if len(b) < HeaderSize {
		return Header{}, ErrShortHeader
	}
	le := binary.LittleEndian
	return Header{
		SrcCID:   le.Uint64(b[0:]),
		DstCID:   le.Uint64(b[8:]),
		SrcPort:  le.Uint32(b[16:]),
		DstPort:  le.Uint32(b[20:]),
		Len:      le.Uint32(b[24:]),
		Type:     le.Uint16(b[28:]),
		Op:       Op(le.Uint16(b[30:])),
		Flags:    le.Uint32(b[32:]),
		BufAlloc: le.Uint32(b[36:]),
		FwdCnt:   le.Uint32(b[40:]),
	}, nil
}

// decodePacket parses a guest-to-host packet whose header and payload may be spread over the readable buffers
// of one descriptor chain. The payload aliases bufs (guest memory): copy what must outlive the chain.
// Only framing is checked here; addressing is judged by checkAddress, with the guest CID.
func decodePacket(bufs [][]byte) (Header, iovec, error) {
	var raw [HeaderSize]byte
	in := iovec(bufs)
	if in.size() < HeaderSize {
		return Header{}, nil, ErrShortHeader
	}
	in.copyTo(raw[:])
	h, _ := DecodeHeader(raw[:])
	if h.Op == OpInvalid || h.Op > OpCreditRequest {
		return h, nil, fmt.Errorf("%w: %d", ErrBadOp, uint16(h.Op))
	}
	if h.Type != TypeStream {
		return h, nil, fmt.Errorf("%w: type %d", ErrBadType, h.Type)
	}
	if h.Op != OpRW {
		// Only RW carries data; a len on other ops is ignored, as the spec gives it no meaning there.
		return h, nil, nil
	}
	if h.Len > maxPayload {
		return h, nil, fmt.Errorf("%w: len %d", ErrTooLarge, h.Len)
	}
	rest := in.skip(HeaderSize)
	if uint64(rest.size()) < uint64(h.Len) {
		return h, nil, fmt.Errorf("%w: len %d, %d bytes after the header", ErrTruncated, h.Len, rest.size())
	}
	return h, rest.take(int(h.Len)), nil
}

// checkAddress judges a decoded packet's CIDs against the guest's CID. The upper 32 bits of both CIDs are
// reserved and must be zero, which the equality checks imply.
func (h *Header) checkAddress(guestCID uint64) error {
	if h.SrcCID != guestCID {
		return fmt.Errorf("%w: %d, want %d", ErrBadSourceCID, h.SrcCID, guestCID)
	}
	if h.DstCID != HostCID {
		return fmt.Errorf("%w: %d", ErrBadDestCID, h.DstCID)
	}
	return nil
}

// iovec is a byte sequence split over several buffers, as a descriptor chain presents it.
type iovec [][]byte

func (v iovec) size() int {
	n := 0
	for _, b := range v {
		n += len(b)
	}
	return n
}

// copyTo copies the first len(dst) bytes of v (or all of v) into dst and returns how many were copied.
func (v iovec) copyTo(dst []byte) int {
	n := 0
	for _, b := range v {
		if n == len(dst) {
			break
		}
		n += copy(dst[n:], b)
	}
	return n
}

// skip returns v without its first n bytes.
func (v iovec) skip(n int) iovec {
	for len(v) > 0 && n >= len(v[0]) {
		n -= len(v[0])
		v = v[1:]
	}
	if len(v) == 0 {
		return nil
	}
	out := make(iovec, len(v))
	copy(out, v)
	out[0] = out[0][n:]
	return out
}

// take returns the first n bytes of v (n must not exceed v.size()).
func (v iovec) take(n int) iovec {
	var out iovec
	for _, b := range v {
		if n == 0 {
			break
		}
		if len(b) > n {
			b = b[:n]
		}
		if len(b) > 0 {
			out = append(out, b)
		}
		n -= len(b)
	}
	return out
}

// scatter writes a byte stream into device-writable buffers in chain order.
type scatter struct {
	bufs iovec
	n    int // bytes written so far
}

// newScatter copies the list of buffers, since writing consumes it, but not the buffers themselves.
func newScatter(bufs [][]byte) *scatter {
	return &scatter{bufs: append(iovec(nil), bufs...)}
}

// room is how many bytes can still be written.
func (s *scatter) room() int { return s.bufs.size() }

// write copies p into the remaining buffers; it returns false, having written nothing, if p does not fit.
func (s *scatter) write(p []byte) bool {
	if len(p) > s.room() {
		return false
	}
	for len(p) > 0 {
		c := copy(s.bufs[0], p)
		p = p[c:]
		s.n += c
		s.bufs[0] = s.bufs[0][c:]
		if len(s.bufs[0]) == 0 {
			s.bufs = s.bufs[1:]
		}
	}
	return true
}

// writePacket scatters a header and its payload into dst; h.Len is set from the payload.
func writePacket(dst *scatter, h Header, payload []byte) bool {
	var raw [HeaderSize]byte
	h.Len = uint32(len(payload))
	h.Encode(raw[:])
	if dst.room() < HeaderSize+len(payload) {
		return false
	}
	return dst.write(raw[:]) && dst.write(payload)
}
