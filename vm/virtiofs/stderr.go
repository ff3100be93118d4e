package virtiofs

import (
	"strings"

	"github.com/sirupsen/logrus"
)

// logLine copies a line of virtiofsd's stderr into the log (vm/child keeps the tail for errors). With virtiofsd
// at its default warn level everything it writes is worth a warning; at info or debug level it narrates normal
// work, which goes to debug.
func (d *Daemon) logLine(log *logrus.Entry, line string) {
	if (d.cfg.LogLevel == "warn" || d.cfg.LogLevel == "err") && !disconnectNoise(line) {
		log.Warn(line)
	} else {
		log.Debug(line)
	}
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
