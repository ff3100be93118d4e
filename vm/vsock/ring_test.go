package vsock

import (
	"bytes"
	"math/rand/v2"
	"testing"
)

// TestRingKeepsOrderAcrossWrap feeds a small ring with random writes and drains so data wraps many times.
func TestRingKeepsOrderAcrossWrap(t *testing.T) {
	r := ring{limit: 37}
	rng := rand.New(rand.NewPCG(1, 2))
	var in, out []byte
	next := byte(0)
	for range 2000 {
		if n := rng.IntN(r.free() + 1); n > 0 {
			chunk := make([]byte, n)
			for i := range chunk {
				chunk[i] = next
				next++
			}
			in = append(in, chunk...)
			r.write(split(chunk, n/2))
		}
		if r.n > r.limit {
			t.Fatalf("ring holds %d bytes over its limit %d", r.n, r.limit)
		}
		if r.n > 0 {
			p := r.peek()
			k := rng.IntN(len(p)) + 1
			out = append(out, p[:k]...)
			r.consume(k)
		}
	}
	for r.n > 0 {
		p := r.peek()
		out = append(out, p...)
		r.consume(len(p))
	}
	if !bytes.Equal(in, out) {
		t.Fatalf("ring reordered or lost data: %d bytes in, %d out", len(in), len(out))
	}
}
