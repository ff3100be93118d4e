package vhostuser

import (
	"fmt"
	"os"
	"strconv"

	"golang.org/x/sys/unix"

	"github.com/kiln-runtime/kiln/vm/virtqueue"
)

// vringRequest applies the per-ring requests.
func (s *session) vringRequest(m *message) ([]byte, error) {
	switch m.req {
	case reqSetVringKick, reqSetVringCall, reqSetVringErr:
		return nil, s.setVringFD(m)
	case reqSetVringAddr:
		a, err := decodeVringAddr(m.payload)
		if err != nil {
			return nil, err
		}
		r, err := s.ring(a.index)
		if err != nil {
			return nil, err
		}
		s.stopDevice()
		r.addr, r.hasAddr = a, true
		return nil, nil
	}
	st, err := decodeVringState(m.payload)
	if err != nil {
		return nil, err
	}
	r, err := s.ring(st.index)
	if err != nil {
		return nil, err
	}
	switch m.req {
	case reqSetVringNum:
		if st.num == 0 || st.num > virtqueue.MaxSize || st.num&(st.num-1) != 0 {
			return nil, fmt.Errorf("vring %d size %d is not a power of two up to %d", st.index, st.num, virtqueue.MaxSize)
		}
		s.stopDevice()
		r.num = uint16(st.num)
	case reqSetVringBase:
		if st.num > 0xffff {
			return nil, fmt.Errorf("vring %d base %d exceeds 16 bits", st.index, st.num)
		}
		s.stopDevice()
		r.base = uint16(st.num)
	case reqGetVringBase:
		// The protocol stops the ring here; it runs again after a new SET_VRING_KICK.
		s.stopDevice()
		setFD(&r.kick, -1)
		return encodeVringState(vringState{index: st.index, num: uint32(r.base)}), nil
	case reqSetVringEnable:
		if st.num > 1 {
			return nil, fmt.Errorf("vring %d enable value %d", st.index, st.num)
		}
		if st.num == 0 {
			s.stopDevice()
		}
		r.enabled = st.num == 1
	}
	return nil, nil
}

func (s *session) ring(index uint32) (*vring, error) {
	if uint64(index) >= uint64(len(s.rings)) {
		return nil, fmt.Errorf("vring index %d out of range (%d queues)", index, len(s.rings))
	}
	return s.rings[index], nil
}

// setVringFD handles SET_VRING_KICK/CALL/ERR, whose u64 carries the ring index and a "no fd" flag.
func (s *session) setVringFD(m *message) error {
	v, err := decodeU64(m.payload)
	if err != nil {
		return err
	}
	if v&^(vringIndexMask|vringNoFD) != 0 {
		return fmt.Errorf("%v: unknown bits in %#x", m.req, v)
	}
	r, err := s.ring(uint32(v & vringIndexMask))
	if err != nil {
		return err
	}
	fd := -1
	if v&vringNoFD == 0 {
		if len(m.fds) != 1 {
			return fmt.Errorf("%v for vring %d: got %d file descriptors, want 1", m.req, v&vringIndexMask, len(m.fds))
		}
		fd = m.takeFD()
		if err := checkEventFD(fd); err != nil {
			_ = unix.Close(fd)
			return fmt.Errorf("%v for vring %d: %w", m.req, v&vringIndexMask, err)
		}
	}
	switch m.req {
	case reqSetVringKick:
		// Polling mode (no kick fd) is not supported: such a ring never becomes ready.
		s.stopDevice()
		setFD(&r.kick, fd)
	case reqSetVringCall:
		setFD(&r.call, fd)
		r.callSet = true
		if s.queues != nil {
			// The frontend swaps call fds while rings run (interrupt masking): follow without a restart.
			idx := v & vringIndexMask
			if err := s.queues[idx].SetCallFD(fd); err != nil {
				return fmt.Errorf("vring %d: %w", idx, err)
			}
		}
	case reqSetVringErr:
		setFD(&r.errFD, fd)
	}
	return nil
}

// checkEventFD refuses a ring descriptor that is not an eventfd. The front end is QEMU, which a guest may have
// taken over: any other descriptor (a pipe of its own stdout, the vhost-user socket itself) kept open by the back
// end could keep QEMU's exit from being seen, or a write to it from ever returning.
func checkEventFD(fd int) error {
	target, err := os.Readlink("/proc/self/fd/" + strconv.Itoa(fd))
	if err != nil {
		return fmt.Errorf("identify the ring descriptor: %w", err)
	}
	if target != "anon_inode:[eventfd]" {
		return fmt.Errorf("the ring descriptor is %s, not an eventfd", target)
	}
	return nil
}
