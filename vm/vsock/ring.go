package vsock

// ring is a fixed-capacity byte ring for the guest's bytes. The writer reads its filled part without the lock
// while the tx path appends to its free part; the two never overlap.
type ring struct {
	buf   []byte
	head  int // first filled byte
	n     int // filled bytes
	limit int
}

func (r *ring) free() int { return r.limit - r.n }

// write appends v; the caller has checked free.
func (r *ring) write(v iovec) {
	if r.buf == nil {
		r.buf = make([]byte, r.limit)
	}
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
