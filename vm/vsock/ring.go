package vsock

// ring is a byte ring for the guest's bytes, holding limit bytes at most. The writer reads its filled part without
// the lock while the tx path appends to its free part; the two never overlap.
type ring struct {
	buf   []byte
	head  int // first filled byte
	n     int // filled bytes
	limit int
}

func (r *ring) free() int { return r.limit - r.n }

// ringStart is the buffer a ring allocates first, at most its limit.
const ringStart = maxPayload

// write appends v; the caller has checked free.
func (r *ring) write(v iovec) {
	r.reserve(r.n + v.size())
	for _, b := range v {
		for len(b) > 0 {
			tail := (r.head + r.n) % len(r.buf)
			end := len(r.buf)
			if tail < r.head {
				end = r.head
			}
			k := copy(r.buf[tail:end], b)
			b = b[k:]
			r.n += k
		}
	}
}

// reserve grows the buffer to hold need bytes, doubling from ringStart up to limit. A connection's memory
// follows the backlog the host side has yet to take, not the window the guest may fill: most connections
// carry a request and an answer at a time. The filled part moves to the front in order, so a writer that took a
// slice of the old buffer from peek, without the lock, consumes the same bytes from the new one.
func (r *ring) reserve(need int) {
	if need <= len(r.buf) {
		return
	}
	size := max(len(r.buf), ringStart)
	for size < need {
		size *= 2
	}
	buf := make([]byte, min(size, r.limit))
	k := copy(buf, r.peek())
	copy(buf[k:], r.buf[:r.n-k])
	r.buf, r.head = buf, 0
}

// peek returns the filled bytes up to the end of the buffer.
func (r *ring) peek() []byte {
	end := min(r.head+r.n, len(r.buf))
	return r.buf[r.head:end]
}

func (r *ring) consume(n int) {
	if n == 0 {
		return
	}
	r.n -= n
	r.head = (r.head + n) % len(r.buf)
	if r.n == 0 {
		r.head = 0
	}
}
