package vhostuser

import (
	"errors"
	"fmt"
	"io"
	"net"

	"golang.org/x/sys/unix"
)

// message is one decoded front-end message. The handler that uses an fd sets its slot to -1; the rest are
// closed after handling.
type message struct {
	header
	payload []byte
	fds     []int
}

func (m *message) needReply() bool { return m.flags&flagNeedReply != 0 }

// takeFD hands the message's only fd to the caller, or -1 when there is none.
func (m *message) takeFD() int {
	if len(m.fds) == 0 {
		return -1
	}
	fd := m.fds[0]
	m.fds[0] = -1
	return fd
}

func (m *message) closeFDs() {
	for i, fd := range m.fds {
		if fd >= 0 {
			unix.Close(fd)
			m.fds[i] = -1
		}
	}
}

// readMessage reads one message and the fds sent with it. It returns io.EOF when the frontend hung up
// between messages.
func readMessage(c *net.UnixConn) (*message, error) {
	hb := make([]byte, headerSize)
	oob := make([]byte, unix.CmsgSpace(maxFDs*4))
	n, oobn, flags, _, err := c.ReadMsgUnix(hb, oob)
	if n == 0 && err == nil {
		err = io.EOF
	}
	var fds []int
	if oobn > 0 {
		var perr error
		fds, perr = parseRights(oob[:oobn])
		if perr != nil && err == nil {
			err = perr
		}
	}
	if flags&unix.MSG_CTRUNC != 0 && err == nil {
		err = fmt.Errorf("more than %d file descriptors with one message", maxFDs)
	}
	if err == nil && n < headerSize {
		_, err = io.ReadFull(c, hb[n:])
	}
	if err != nil {
		closeAll(fds)
		if n == 0 && errors.Is(err, io.EOF) {
			return nil, io.EOF
		}
		return nil, fmt.Errorf("read message header: %w", unexpectedEOF(err))
	}
	h, err := decodeHeader(hb)
	if err != nil {
		closeAll(fds)
		return nil, err
	}
	m := &message{header: h, fds: fds, payload: make([]byte, h.size)}
	if _, err := io.ReadFull(c, m.payload); err != nil {
		m.closeFDs()
		return nil, fmt.Errorf("read %v payload of %d bytes: %w", h.req, h.size, unexpectedEOF(err))
	}
	return m, nil
}

func unexpectedEOF(err error) error {
	if errors.Is(err, io.EOF) {
		return io.ErrUnexpectedEOF
	}
	return err
}

func parseRights(oob []byte) ([]int, error) {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, fmt.Errorf("parse control message: %w", err)
	}
	var fds []int
	for _, cm := range msgs {
		if cm.Header.Level != unix.SOL_SOCKET || cm.Header.Type != unix.SCM_RIGHTS {
			continue
		}
		got, err := unix.ParseUnixRights(&cm)
		if err != nil {
			closeAll(fds)
			return nil, fmt.Errorf("parse SCM_RIGHTS: %w", err)
		}
		fds = append(fds, got...)
	}
	return fds, nil
}

func closeAll(fds []int) {
	for _, fd := range fds {
		if fd >= 0 {
			unix.Close(fd)
		}
	}
}

// writeReply sends a reply to req carrying payload.
func writeReply(w io.Writer, req request, payload []byte) error {
	b := make([]byte, headerSize+len(payload))
	encodeHeader(b, header{req: req, flags: flagVersion | flagReply, size: uint32(len(payload))})
	copy(b[headerSize:], payload)
	if _, err := w.Write(b); err != nil {
		return fmt.Errorf("write %v reply: %w", req, err)
	}
	return nil
}
