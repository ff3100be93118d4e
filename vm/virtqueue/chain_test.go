package virtqueue

import (
	"errors"
	"strings"
	"testing"
)

// TestPopBoundsChainsByQueueSize pins VIRTIO 1.2 §2.7.5.3.1 (finding 9 of issue 11): a chain, direct
// descriptors and indirect table together, may not be longer than the queue, so an indirect table holds at
// most queue-size descriptors whatever length the driver claims for it.
func TestPopBoundsChainsByQueueSize(t *testing.T) {
	table := uint64(dataBase + 0x1000)
	// chainIn links n readable descriptors of the table at base, starting at entry 0.
	chainIn := func(r *testRing, base uint64, n int) {
		for i := range n {
			flags, next := uint16(descFNext), uint16(i+1)
			if i == n-1 {
				flags, next = 0, 0
			}
			r.setDesc(base, uint16(i), dataBase, 1, flags, next)
		}
	}
	tests := []struct {
		name    string
		build   func(r *testRing) uint16 // returns the head to offer
		buffers int                      // buffers in the accepted chain
		want    string                   // error text; empty when the chain is valid
	}{
		{"indirect table of queue size", func(r *testRing) uint16 {
			chainIn(r, table, testSize)
			r.setDesc(descAddr, 0, table, 16*testSize, descFIndirect, 0)
			return 0
		}, testSize, ""},
		{"indirect table longer than the queue, one descriptor used", func(r *testRing) uint16 {
			chainIn(r, table, 1)
			r.setDesc(descAddr, 0, table, 16*(testSize+1), descFIndirect, 0)
			return 0
		}, 0, "longer than the queue"},
		{"indirect table of 2048 entries", func(r *testRing) uint16 {
			chainIn(r, table, 1)
			r.setDesc(descAddr, 0, table, 16*(memSize/32), descFIndirect, 0)
			return 0
		}, 0, "longer than the queue"},
		{"indirect chain longer than the queue", func(r *testRing) uint16 {
			chainIn(r, table, testSize+1)
			r.setDesc(descAddr, 0, table, 16*(testSize+1), descFIndirect, 0)
			return 0
		}, 0, "longer than the queue"},
		{"direct descriptors then an indirect table, queue size in total", func(r *testRing) uint16 {
			r.setDesc(descAddr, 0, dataBase, 1, descFNext, 1)
			r.setDesc(descAddr, 1, dataBase, 1, descFNext, 2)
			chainIn(r, table, testSize-2)
			r.setDesc(descAddr, 2, table, 16*(testSize-2), descFIndirect, 0)
			return 0
		}, testSize, ""},
		{"direct descriptors then an indirect table, longer than the queue in total", func(r *testRing) uint16 {
			r.setDesc(descAddr, 0, dataBase, 1, descFNext, 1)
			r.setDesc(descAddr, 1, dataBase, 1, descFNext, 2)
			chainIn(r, table, testSize-1)
			r.setDesc(descAddr, 2, table, 16*(testSize-1), descFIndirect, 0)
			return 0
		}, 0, "longer than the queue"},
		{"indirect descriptor marked device-writable", func(r *testRing) uint16 {
			// §2.7.5.3.2: the device ignores the write flag of the descriptor that refers to a table.
			chainIn(r, table, 2)
			r.setDesc(descAddr, 0, table, 32, descFIndirect|descFWrite, 0)
			return 0
		}, 2, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := newTestRing(t)
			q := r.queue(false, -1, -1)
			head := tt.build(r)
			r.offer(head)
			c, err := q.Pop()
			if tt.want == "" {
				if err != nil {
					t.Fatalf("Pop refused a valid chain: %v", err)
				}
				if n := len(c.Readable) + len(c.Writable); n != tt.buffers {
					t.Fatalf("chain has %d buffers, want %d", n, tt.buffers)
				}
				return
			}
			if err == nil {
				t.Fatalf("Pop accepted the chain: %d readable, %d writable buffers", len(c.Readable), len(c.Writable))
			}
			var ce *ChainError
			if !errors.As(err, &ce) || ce.Head != head || !errors.Is(err, ErrMalformedChain) {
				t.Fatalf("error %v is not a ChainError for head %d", err, head)
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("error %q does not mention %q", err, tt.want)
			}
		})
	}
}
