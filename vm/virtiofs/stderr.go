package virtiofs

import (
	"strings"
	"time"

	"github.com/sirupsen/logrus"
)

// Bounds of virtiofsd's warnings in the log: the first warnBurst of each warnInterval, then a count.
const (
	warnBurst    = 10
	warnInterval = time.Minute
)

// logLine copies a line of virtiofsd's stderr into the log (vm/child keeps the tail for errors). With virtiofsd
// at its default warn level everything it writes is worth a warning, within warnBurst a warnInterval: a guest
// can make it write a line for each request it malforms. At info or debug level it narrates normal work, which
// goes to debug.
func (d *Daemon) logLine(log *logrus.Entry, line string) {
	if (d.cfg.LogLevel != "warn" && d.cfg.LogLevel != "err") || disconnectNoise(line) {
		log.Debug(line)
		return
	}
	ok, summary := d.warn.Allow()
	if summary > 0 {
		log.WithField("suppressed", summary).Warn("more of virtiofsd's warnings were not logged")
	}
	if ok {
		log.Warn(line)
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
