package vsock

import (
	"bytes"
	"errors"
	"testing"
)

const testCID = 42

func testHeader(op Op, n int) Header {
	return Header{SrcCID: testCID, DstCID: HostCID, SrcPort: 5000, DstPort: 1024, Len: uint32(n),
		Type: TypeStream, Op: op, BufAlloc: 1 << 18}
}

func encodeHeader(h Header) []byte {
	b := make([]byte, HeaderSize)
	h.Encode(b)
	return b
}

// split cuts b at the given offsets, as a driver may spread a packet over descriptors.
func split(b []byte, cuts ...int) [][]byte {
	var out [][]byte
	prev := 0
	for _, c := range cuts {
		out = append(out, b[prev:c])
		prev = c
	}
	return append(out, b[prev:])
}

func TestHeaderWireLayout(t *testing.T) {
	h := Header{SrcCID: 0x0102030405060708, DstCID: 2, SrcPort: 0x11223344, DstPort: 0x55667788, Len: 9,
		Type: 1, Op: OpRW, Flags: 3, BufAlloc: 0xaabbccdd, FwdCnt: 0x01020304}
	want := []byte{
		0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02, 0x01, // src_cid
		2, 0, 0, 0, 0, 0, 0, 0, // dst_cid
		0x44, 0x33, 0x22, 0x11, // src_port
		0x88, 0x77, 0x66, 0x55, // dst_port
		9, 0, 0, 0, // len
		1, 0, // type
		5, 0, // op
		3, 0, 0, 0, // flags
		0xdd, 0xcc, 0xbb, 0xaa, // buf_alloc
		0x04, 0x03, 0x02, 0x01, // fwd_cnt
	}
	got := encodeHeader(h)
	if !bytes.Equal(got, want) {
		t.Fatalf("Encode:\n got %x\nwant %x", got, want)
	}
	back, err := DecodeHeader(got)
	if err != nil || back != h {
		t.Fatalf("DecodeHeader = %+v, %v; want %+v", back, err, h)
	}
}

func TestDecodePacket(t *testing.T) {
	payload := []byte("hello, guest")
	rw := append(encodeHeader(testHeader(OpRW, len(payload))), payload...)
	withType := func(typ uint16) []byte {
		h := testHeader(OpRequest, 0)
		h.Type = typ
		return encodeHeader(h)
	}
	withOp := func(op Op) []byte { return encodeHeader(testHeader(op, 0)) }
	tests := []struct {
		name    string
		bufs    [][]byte
		wantErr error
		wantPay string
	}{
		{"rw in one buffer", [][]byte{rw}, nil, "hello, guest"},
		{"header and payload apart", split(rw, HeaderSize), nil, "hello, guest"},
		{"header split inside", split(rw, 3, 30, HeaderSize+2), nil, "hello, guest"},
		{"empty buffers in between", [][]byte{rw[:10], {}, rw[10:HeaderSize], {}, rw[HeaderSize:]}, nil, "hello, guest"},
		{"trailing bytes beyond len ignored", [][]byte{append(append([]byte{}, rw...), "junk"...)}, nil, "hello, guest"},
		{"request ignores len", [][]byte{encodeHeader(testHeader(OpRequest, 100))}, nil, ""},
		{"short header", [][]byte{rw[:HeaderSize-1]}, ErrShortHeader, ""},
		{"no buffers", nil, ErrShortHeader, ""},
		{"len beyond chain", [][]byte{rw[:len(rw)-1]}, ErrTruncated, ""},
		{"len beyond chain, split", split(rw[:len(rw)-1], HeaderSize), ErrTruncated, ""},
		{"len too large", [][]byte{encodeHeader(testHeader(OpRW, maxPayload+1)), make([]byte, maxPayload+1)}, ErrTooLarge, ""},
		{"seqpacket type", [][]byte{withType(2)}, ErrBadType, ""},
		{"zero type", [][]byte{withType(0)}, ErrBadType, ""},
		{"invalid op", [][]byte{withOp(OpInvalid)}, ErrBadOp, ""},
		{"op past credit request", [][]byte{withOp(8)}, ErrBadOp, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, pay, err := decodePacket(tt.bufs)
			if !errors.Is(err, tt.wantErr) {
				t.Fatalf("err = %v, want %v", err, tt.wantErr)
			}
			if err != nil {
				return
			}
			got := make([]byte, pay.size())
			pay.copyTo(got)
			if string(got) != tt.wantPay {
				t.Fatalf("payload = %q, want %q", got, tt.wantPay)
			}
		})
	}
}

func TestCheckAddress(t *testing.T) {
	tests := []struct {
		name     string
		src, dst uint64
		want     error
	}{
		{"guest to host", testCID, HostCID, nil},
		{"spoofed source", testCID + 1, HostCID, ErrBadSourceCID},
		{"source with reserved upper bits", testCID | 1<<32, HostCID, ErrBadSourceCID},
		{"to another guest", testCID, 7, ErrBadDestCID},
		{"to hypervisor", testCID, 0, ErrBadDestCID},
		{"destination with reserved upper bits", testCID, HostCID | 1<<40, ErrBadDestCID},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := testHeader(OpRW, 0)
			h.SrcCID, h.DstCID = tt.src, tt.dst
			if err := h.checkAddress(testCID); !errors.Is(err, tt.want) {
				t.Fatalf("checkAddress = %v, want %v", err, tt.want)
			}
		})
	}
}

func TestWritePacketScatters(t *testing.T) {
	h := Header{SrcCID: HostCID, DstCID: testCID, SrcPort: 1, DstPort: 2, Type: TypeStream, Op: OpRW}
	payload := bytes.Repeat([]byte("x"), 100)
	tests := []struct {
		name  string
		sizes []int
		ok    bool
	}{
		{"linux 6.1 layout", []int{HeaderSize, 4096}, true},
		{"one buffer", []int{4096}, true},
		{"many small", []int{10, 10, 30, 20, 74}, true},
		{"exact fit", []int{HeaderSize + 100}, true},
		{"one byte short", []int{HeaderSize + 99}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var bufs [][]byte
			for _, s := range tt.sizes {
				bufs = append(bufs, make([]byte, s))
			}
			dst := newScatter(bufs)
			if ok := writePacket(dst, h, payload); ok != tt.ok {
				t.Fatalf("writePacket = %v, want %v", ok, tt.ok)
			}
			if !tt.ok {
				if dst.n != 0 {
					t.Fatalf("wrote %d bytes of a packet that does not fit", dst.n)
				}
				return
			}
			if dst.n != HeaderSize+len(payload) {
				t.Fatalf("wrote %d bytes, want %d", dst.n, HeaderSize+len(payload))
			}
			got, pay, err := decodePacket(bufs)
			want := h
			want.Len = 100
			if err != nil || got != want {
				t.Fatalf("decode = %+v, %v; want %+v", got, err, want)
			}
			b := make([]byte, pay.size())
			pay.copyTo(b)
			if !bytes.Equal(b, payload) {
				t.Fatal("payload changed")
			}
			for i, s := range tt.sizes {
				if len(bufs[i]) != s {
					t.Fatalf("caller's buffer %d was resliced", i)
				}
			}
		})
	}
}

func FuzzDecodePacket(f *testing.F) {
	rw := append(encodeHeader(testHeader(OpRW, 5)), "hello"...)
	f.Add(rw, uint8(0), uint8(0))
	f.Add(rw, uint8(HeaderSize), uint8(2))
	f.Add(encodeHeader(testHeader(OpShutdown, 0)), uint8(7), uint8(30))
	f.Add([]byte{1, 2, 3}, uint8(1), uint8(2))
	f.Fuzz(func(t *testing.T, b []byte, c1, c2 uint8) {
		cuts := []int{min(int(c1), len(b)), min(int(c1)+int(c2), len(b))}
		h, pay, err := decodePacket(split(b, cuts...))
		if err != nil {
			return
		}
		if h.Type != TypeStream || h.Op == OpInvalid || h.Op > OpCreditRequest {
			t.Fatalf("accepted %+v", h)
		}
		if h.Op == OpRW {
			if pay.size() != int(h.Len) || pay.size() > maxPayload || HeaderSize+pay.size() > len(b) {
				t.Fatalf("payload of %d bytes for len %d in %d bytes", pay.size(), h.Len, len(b))
			}
			got := make([]byte, pay.size())
			pay.copyTo(got)
			if !bytes.Equal(got, b[HeaderSize:HeaderSize+int(h.Len)]) {
				t.Fatal("payload is not the bytes after the header")
			}
		}
		// Re-encoding what was decoded gives the same header bytes.
		if re := encodeHeader(h); !bytes.Equal(re, b[:HeaderSize]) {
			t.Fatalf("round trip: %x != %x", re, b[:HeaderSize])
		}
	})
}
