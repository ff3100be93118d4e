// Package stream defines the deterministic byte stream that the test guest's
// source port (5003) sends, so that a host-side test can compute the same
// bytes and compare. It owns only the stream's definition: it must not know
// about vsock, the guest or the host.
package stream

import (
	"encoding/binary"
	"io"
)

// New returns an endless reader of the stream for seed: the outputs of the
// SplitMix64 generator (state starts at seed; each step adds
// 0x9e3779b97f4a7c15 to the state and mixes it), each written as 8
// little-endian bytes. Read sizes do not change the bytes.
func New(seed uint64) io.Reader {
	return &reader{state: seed, off: 8}
}

type reader struct {
	state   uint64
	pending [8]byte
	// off is how much of pending has been read; 8 means none is left.
	off int
}

func (r *reader) Read(p []byte) (int, error) {
	n := 0
	if r.off < len(r.pending) {
		n = copy(p, r.pending[r.off:])
		r.off += n
	}
	for len(p)-n >= 8 {
		binary.LittleEndian.PutUint64(p[n:], r.next())
		n += 8
	}
	if n < len(p) {
		binary.LittleEndian.PutUint64(r.pending[:], r.next())
		r.off = copy(p[n:], r.pending[:])
		n += r.off
	}
	return n, nil
}

func (r *reader) next() uint64 {
	r.state += 0x9e3779b97f4a7c15
	z := r.state
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9
	z = (z ^ (z >> 27)) * 0x94d049bb133111eb
	return z ^ (z >> 31)
}
