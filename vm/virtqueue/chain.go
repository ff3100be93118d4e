package virtqueue

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Chain is one descriptor chain popped from the available ring. Buffers alias guest memory.
type Chain struct {
	Head     uint16
	Readable [][]byte // driver-written buffers (device reads), in chain order
	Writable [][]byte // device-writable buffers, in chain order
}

// ErrMalformedChain is wrapped by the ChainError Pop returns for a chain that breaks the ring's rules.
var ErrMalformedChain = errors.New("malformed descriptor chain")

// ChainError reports a chain Pop refused. The chain was consumed from the available ring, so a device that
// wants to give the buffers back may Push(Head, 0) when Head is in range.
type ChainError struct {
	Head uint16
	Err  error
}

// Error names the head so the refused chain can be found in the ring.
func (e *ChainError) Error() string {
	return fmt.Sprintf("descriptor chain at head %d: %v", e.Head, e.Err)
}

// Unwrap lets errors.Is match both ErrMalformedChain and the specific cause.
func (e *ChainError) Unwrap() []error { return []error{ErrMalformedChain, e.Err} }

// descriptor is one decoded descriptor table entry.
type descriptor struct {
	addr  uint64
	len   uint32
	flags uint16
	next  uint16
}

func readDesc(table []byte, i uint16) descriptor {
	b := table[descSize*int(i):]
	return descriptor{
		addr:  binary.LittleEndian.Uint64(b[0:]),
		len:   binary.LittleEndian.Uint32(b[8:]),
		flags: binary.LittleEndian.Uint16(b[12:]),
		next:  binary.LittleEndian.Uint16(b[14:]),
	}
}

// Pop returns the next available chain, or (nil, nil) when the available ring is empty.
// A malformed chain is consumed and reported as a *ChainError.
func (q *Queue) Pop() (*Chain, error) {
	availIdx := binary.LittleEndian.Uint16(q.avail[2:])
	if availIdx == q.lastAvail {
		if !q.eventIdx {
			return nil, nil
		}
		// Ask for a kick on the next buffer, then look again: the driver may have added one before it could
		// see the new avail_event.
		binary.LittleEndian.PutUint16(q.used[ringHeaderLen+usedElemSize*int(q.size):], q.lastAvail)
		q.fence()
		availIdx = binary.LittleEndian.Uint16(q.avail[2:])
		if availIdx == q.lastAvail {
			return nil, nil
		}
	}
	if pending := availIdx - q.lastAvail; pending > q.size {
		return nil, fmt.Errorf("pop descriptor chain: available index %d is %d ahead of %d, more than queue size %d",
			availIdx, pending, q.lastAvail, q.size)
	}
	// Ring entries must be read after the index that published them.
	q.fence()
	head := binary.LittleEndian.Uint16(q.avail[ringHeaderLen+2*int(q.lastAvail%q.size):])
	q.lastAvail++
	c := &Chain{Head: head}
	if err := q.walk(c); err != nil {
		return nil, &ChainError{Head: head, Err: err}
	}
	return c, nil
}

// walk follows the chain starting at c.Head, descending into at most one indirect table.
//
// VIRTIO 1.2 §2.7.5.3.1 forbids a chain longer than the queue size, counting every buffer descriptor whether it
// sits in the descriptor table or in an indirect table. Holding the driver to that bounds the work and memory
// one chain can cost, and finds loops: a walk that needs more steps than its table has entries revisits one.
func (q *Queue) walk(c *Chain) error {
	if c.Head >= q.size {
		return fmt.Errorf("head index out of range (queue size %d)", q.size)
	}
	table, n := q.desc, uint32(q.size)
	indirect := false
	buffers := uint32(0) // buffer descriptors taken so far, over both tables
	i := c.Head
	for steps := uint32(1); ; steps++ {
		if steps > n {
			return fmt.Errorf("chain longer than its %d-entry table (loop?)", n)
		}
		d := readDesc(table, i)
		if d.flags&descFIndirect != 0 {
			if indirect {
				return errors.New("indirect descriptor inside an indirect table")
			}
			if d.flags&descFNext != 0 {
				return errors.New("descriptor has both INDIRECT and NEXT")
			}
			if d.len == 0 || d.len%descSize != 0 {
				return fmt.Errorf("indirect table length %d is not a positive multiple of %d", d.len, descSize)
			}
			// Checked before the table is looked at, so a driver cannot make us map or walk more than a queue's
			// worth of descriptors, whatever length it claims.
			if entries := d.len / descSize; entries > uint32(q.size) {
				return fmt.Errorf("indirect table of %d descriptors is longer than the queue (size %d)",
					entries, q.size)
			}
			t, err := q.mem.Slice(d.addr, uint64(d.len))
			if err != nil {
				return fmt.Errorf("indirect table: %w", err)
			}
			table, n, indirect, i, steps = t, d.len/descSize, true, 0, 0
			continue
		}
		if buffers++; buffers > uint32(q.size) {
			return fmt.Errorf("chain of more than %d descriptors is longer than the queue", q.size)
		}
		buf, err := q.mem.Slice(d.addr, uint64(d.len))
		if err != nil {
			return fmt.Errorf("descriptor %d buffer: %w", i, err)
		}
		if d.flags&descFWrite != 0 {
			c.Writable = append(c.Writable, buf)
		} else {
			if len(c.Writable) > 0 {
				return fmt.Errorf("descriptor %d is device-readable after a device-writable one", i)
			}
			c.Readable = append(c.Readable, buf)
		}
		if d.flags&descFNext == 0 {
			return nil
		}
		if uint32(d.next) >= n {
			return fmt.Errorf("descriptor %d next index %d out of range (table size %d)", i, d.next, n)
		}
		i = d.next
	}
}
