package vsock

import (
	"bytes"
	"math/rand/v2"
	"testing"
)

// TestRingKeepsOrderAcrossWrap feeds a ring with random writes and drains so data wraps many times. Like the
// connection's writer, the drain takes its slice with peek before the next write and consumes it after, so a
// ring that grows in between must keep that slice's bytes first.
func TestRingKeepsOrderAcrossWrap(t *testing.T) {
	tests := []struct {
		name  string
		limit int
	}{
		{"smaller than its first buffer", 37},
		{"grows", 3*ringStart + 37},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := ring{limit: tt.limit}
			rng := rand.New(rand.NewPCG(1, 2))
			var in, out []byte
			next := byte(0)
			heldAcrossGrowth := 0
			for range 2000 {
				held := r.peek()
				// Writes of up to a packet, so that a backlog builds up over several and the buffer grows under
				// a held slice.
				if n := rng.IntN(min(r.free(), ringStart) + 1); n > 0 {
					chunk := make([]byte, n)
					for i := range chunk {
						chunk[i] = next
						next++
					}
					in = append(in, chunk...)
					size := len(r.buf)
					r.write(split(chunk, n/2))
					if len(r.buf) != size && len(held) > 0 {
						heldAcrossGrowth++
					}
				}
				if r.n > r.limit || len(r.buf) > r.limit {
					t.Fatalf("ring holds %d bytes in a %d-byte buffer, over its limit %d", r.n, len(r.buf), r.limit)
				}
				if len(held) > 0 {
					k := rng.IntN(len(held)) + 1
					out = append(out, held[:k]...)
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
			if want := tt.limit > ringStart; (heldAcrossGrowth > 0) != want {
				t.Fatalf("the buffer grew under a held slice %d times; want growth %v", heldAcrossGrowth, want)
			}
		})
	}
}

// TestRingGrowsWithItsBacklog checks that a ring allocates as its backlog needs, doubling from ringStart, and
// never beyond its limit: a connection that carries a request at a time holds one packet's buffer, not its window.
func TestRingGrowsWithItsBacklog(t *testing.T) {
	r := ring{limit: 1 << 20}
	if r.buf != nil {
		t.Fatal("a new ring holds a buffer")
	}
	for _, tt := range []struct{ add, wantBuf int }{
		{100, ringStart},
		{ringStart - 100, ringStart},
		{1, 2 * ringStart},
		{2 * ringStart, 4 * ringStart},
		{r.limit - 3*ringStart - 1, r.limit},
	} {
		r.write(iovec{make([]byte, tt.add)})
		if len(r.buf) != tt.wantBuf {
			t.Fatalf("holding %d bytes: a %d-byte buffer, want %d", r.n, len(r.buf), tt.wantBuf)
		}
	}
	if r.free() != 0 {
		t.Fatalf("full ring has %d bytes free", r.free())
	}
}
