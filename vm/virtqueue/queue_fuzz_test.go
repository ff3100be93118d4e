package virtqueue

import (
	"testing"
)

// FuzzPop lets the fuzzer write the whole ring (descriptor table, available ring and an indirect table area)
// and checks that popping never panics and every accepted chain stays inside guest memory.
func FuzzPop(f *testing.F) {
	f.Add(make([]byte, 16*testSize+6+2*testSize))
	f.Fuzz(func(t *testing.T, ring []byte) {
		r := newTestRing(t)
		copy(r.bytes(memBase, memSize), ring)
		q := r.queue(len(ring)%2 == 0, -1, -1)
		for range 2 * testSize {
			c, err := q.Pop()
			if c == nil {
				if err == nil {
					return
				}
				continue
			}
			for _, b := range append(c.Readable, c.Writable...) {
				if len(b) > 0 {
					b[len(b)-1]++ // every accepted buffer must be mapped and writable
				}
			}
		}
	})
}
