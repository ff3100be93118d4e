package vhostuser

import (
	"bytes"
	"io"
	"testing"

	"github.com/sirupsen/logrus"

	"github.com/kiln-runtime/kiln/vm/virtqueue"
)

// nopDevice never sees a start: fuzzed messages carry no fds, so no ring gets a kick.
type nopDevice struct{}

func (nopDevice) NumQueues() int   { return 2 }
func (nopDevice) Features() uint64 { return 1 }
func (nopDevice) Config() []byte   { return []byte{3, 0, 0, 0, 0, 0, 0, 0} }
func (nopDevice) Start([]*virtqueue.Queue) error {
	panic("device started from fuzzed input without fds")
}
func (nopDevice) Stop() {}

func rawMessage(req request, flags uint32, payload []byte) []byte {
	b := make([]byte, headerSize+len(payload))
	encodeHeader(b, header{req: req, flags: flagVersion | flags, size: uint32(len(payload))})
	copy(b[headerSize:], payload)
	return b
}

// FuzzMessages decodes a byte stream into messages and feeds them to a session, which must never panic and
// must answer every request that has a reply of its own with a well-formed reply.
func FuzzMessages(f *testing.F) {
	seeds := [][]byte{
		rawMessage(reqGetFeatures, 0, nil),
		rawMessage(reqSetFeatures, flagNeedReply, encodeU64(FeatureVersion1|FeatureProtocolFeatures)),
		rawMessage(reqSetProtocolFeatures, 0, encodeU64(offeredProtoFeatures)),
		rawMessage(reqGetConfig, 0, encodeConfig(configSpace{offset: 2, size: 8, data: make([]byte, 8)})),
		rawMessage(reqSetVringAddr, flagNeedReply, vringAddrPayload(1)),
		rawMessage(reqSetVringNum, 0, stateMsg(0, 256)),
		rawMessage(reqGetVringBase, 0, stateMsg(1, 0)),
		rawMessage(reqSetVringEnable, flagNeedReply, stateMsg(0, 1)),
		rawMessage(reqSetMemTable, flagNeedReply, (&fakeFrontend{}).memTable()),
		rawMessage(reqSetVringKick, flagNeedReply, encodeU64(vringNoFD|1)),
		rawMessage(99, flagNeedReply, []byte{1, 2, 3}),
	}
	for _, s := range seeds {
		f.Add(s)
	}
	f.Add(bytes.Join(seeds, nil))
	f.Fuzz(func(t *testing.T, data []byte) {
		log := logrus.New()
		log.SetOutput(io.Discard)
		var out bytes.Buffer
		s := newSession(nopDevice{}, GuestRAM{}, &out, logrus.NewEntry(log))
		defer s.close()
		for len(data) >= headerSize {
			h, err := decodeHeader(data)
			if err != nil {
				return
			}
			data = data[headerSize:]
			if int(h.size) > len(data) {
				return
			}
			m := &message{header: h, payload: data[:h.size]}
			data = data[h.size:]
			before := out.Len()
			err = s.handle(m)
			checkReply(t, m, out.Bytes()[before:], err)
			if err != nil {
				return
			}
		}
	})
}

// checkReply verifies that whatever the session wrote for m is one well-formed reply to m.
func checkReply(t *testing.T, m *message, written []byte, err error) {
	t.Helper()
	if len(written) == 0 {
		if hasReply(m.req) && err == nil {
			t.Fatalf("%v answered nothing", m.req)
		}
		return
	}
	h, derr := decodeHeader(written)
	if derr != nil || h.req != m.req || h.flags&flagReply == 0 || int(h.size) != len(written)-headerSize {
		t.Fatalf("malformed reply %x to %v (%v)", written, m.req, derr)
	}
	if !hasReply(m.req) && (h.size != 8 || !m.needReply()) {
		t.Fatalf("unexpected reply %x to %v", written, m.req)
	}
	if m.req == reqGetVringBase && h.size != 8 {
		t.Fatalf("GET_VRING_BASE reply of %d bytes", h.size)
	}
}
