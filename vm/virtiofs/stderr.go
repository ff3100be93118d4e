package virtiofs

import (
	"bufio"
	"io"
	"strings"
	"sync"
)

// logStderr copies virtiofsd's stderr into the log, one entry per line, and keeps its tail for errors. With
// virtiofsd at its default warn level everything it writes is worth a warning; at info or debug level it
// narrates normal work, which goes to debug.
func (d *Daemon) logStderr(r io.ReadCloser) {
	defer close(d.logged)
	defer r.Close()
	s := bufio.NewScanner(r)
	s.Buffer(make([]byte, 0, 4096), 64<<10)
	quiet := d.cfg.LogLevel == "warn" || d.cfg.LogLevel == "err"
	for s.Scan() {
		line := s.Text()
		_, _ = d.stderr.Write([]byte(line + "\n"))
		if quiet && !disconnectNoise(line) {
			d.cfg.Log.Warn(line)
		} else {
			d.cfg.Log.Debug(line)
		}
	}
	// A line longer than the scanner's buffer stops the scan; drain so virtiofsd never blocks on a full pipe.
	_, _ = io.Copy(io.Discard, r)
}

// tailBuffer keeps the last max bytes written to it.
type tailBuffer struct {
	mu  sync.Mutex
	max int
	buf []byte
}

func newTailBuffer(max int) *tailBuffer { return &tailBuffer{max: max} }

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

// disconnectNoise reports the warnings QEMU 7.2's virtiofsd prints each time its client disconnects, which is
// how every VM ends, or when it is stopped before a client came; they would otherwise turn each VM stop into
// warnings.
func disconnectNoise(line string) bool {
	for _, p := range []string{"fv_remove_watch: TODO!", "virtio_loop: Unexpected poll revents", "vhost socket accept: Interrupted system call"} {
		if strings.HasPrefix(line, p) {
			return true
		}
	}
	return false
}
