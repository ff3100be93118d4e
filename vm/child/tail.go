package child

import (
	"bytes"
	"sync"
)

// tailBuffer is an io.Writer that keeps the last max bytes written to it, so that an error about the program
// can quote what it said. Safe for concurrent use.
type tailBuffer struct {
	mu  sync.Mutex
	max int
	buf []byte
}

func newTailBuffer(max int) *tailBuffer { return &tailBuffer{max: max} }

// Write keeps p, dropping the oldest bytes beyond the limit.
func (t *tailBuffer) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.buf = append(t.buf, p...)
	if len(t.buf) > t.max {
		t.buf = append([]byte(nil), t.buf[len(t.buf)-t.max:]...)
	}
	return len(p), nil
}

// Bytes returns a copy of what is kept.
func (t *tailBuffer) Bytes() []byte {
	t.mu.Lock()
	defer t.mu.Unlock()
	return append([]byte(nil), t.buf...)
}

// lineWriter hands each complete line written to it to emit, without its newline; a line longer than maxLine
// goes out in pieces, so a program that never writes a newline cannot grow it without bound. exec writes to it
// from one goroutine.
type lineWriter struct {
	emit    func(string)
	partial []byte
}

func (w *lineWriter) Write(p []byte) (int, error) {
	n := len(p)
	for len(p) > 0 {
		i := bytes.IndexByte(p, '\n')
		if i < 0 {
			w.add(p)
			break
		}
		w.add(p[:i])
		w.emit(string(w.partial))
		w.partial = w.partial[:0]
		p = p[i+1:]
	}
	return n, nil
}

// add appends to the pending line, handing over pieces of maxLine bytes while it is longer than that.
func (w *lineWriter) add(p []byte) {
	w.partial = append(w.partial, p...)
	for len(w.partial) > maxLine {
		w.emit(string(w.partial[:maxLine]))
		w.partial = append(w.partial[:0], w.partial[maxLine:]...)
	}
}

// flush hands over a last line that had no newline.
func (w *lineWriter) flush() {
	if len(w.partial) > 0 {
		w.emit(string(w.partial))
		w.partial = w.partial[:0]
	}
}
