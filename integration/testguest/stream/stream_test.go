package stream

import (
	"bytes"
	"encoding/hex"
	"io"
	"testing"
)

// The first words of SplitMix64 from seed 0 are published test vectors of the
// generator; pinning them keeps the host and guest on the same definition.
func TestFirstWordsMatchSplitMix64(t *testing.T) {
	want := []uint64{0xe220a8397b1dcdaf, 0x6e789e6aa1b965f4, 0x06c45d188009454f}
	buf := make([]byte, 8*len(want))
	if _, err := io.ReadFull(New(0), buf); err != nil {
		t.Fatal(err)
	}
	for i, w := range want {
		var got uint64
		for b := 7; b >= 0; b-- {
			got = got<<8 | uint64(buf[8*i+b])
		}
		if got != w {
			t.Errorf("word %d = %#x, want %#x", i, got, w)
		}
	}
}

func TestReadSizesDoNotChangeBytes(t *testing.T) {
	const total = 10007
	ref := make([]byte, total)
	if _, err := io.ReadFull(New(42), ref); err != nil {
		t.Fatal(err)
	}
	for _, chunk := range []int{1, 3, 7, 8, 9, 15, 16, 17, 4096} {
		r := New(42)
		var got bytes.Buffer
		buf := make([]byte, chunk)
		for got.Len() < total {
			n, err := r.Read(buf[:min(chunk, total-got.Len())])
			if err != nil {
				t.Fatal(err)
			}
			got.Write(buf[:n])
		}
		if !bytes.Equal(got.Bytes(), ref) {
			t.Errorf("chunk size %d: bytes differ from one big read", chunk)
		}
	}
}

func TestSeedsGiveDifferentStreams(t *testing.T) {
	a, b := make([]byte, 64), make([]byte, 64)
	io.ReadFull(New(1), a)
	io.ReadFull(New(2), b)
	if bytes.Equal(a, b) {
		t.Fatalf("seeds 1 and 2 gave the same bytes: %s", hex.EncodeToString(a))
	}
}
