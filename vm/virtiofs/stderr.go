package virtiofs

import (
	"bufio"
	"io"
	"strings"
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
