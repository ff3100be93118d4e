package virtiofs

import (
	"io"
	"testing"

	"github.com/sirupsen/logrus"
	logtest "github.com/sirupsen/logrus/hooks/test"

	"github.com/kiln-runtime/kiln/lograte"
)

// A guest that makes virtiofsd complain at the rate of its requests gets warnBurst warnings into the log, then a
// count of the rest (when the next minute opens, or virtiofsd stops); lines at its info level, and the noise of every disconnect, go to debug.
func TestLogLineBoundsWarnings(t *testing.T) {
	for _, tt := range []struct {
		level    string
		line     string
		warnings int
	}{
		{"warn", "fuse: do_write_buf: buffer size doesn't match arg->size", warnBurst},
		{"err", "elem 0 too small for data len", warnBurst},
		{"warn", "fv_remove_watch: TODO!", 0},
		{"info", "fv_queue_thread: Waiting for Queue 1 event", 0},
	} {
		log := logrus.New()
		log.SetOutput(io.Discard)
		log.SetLevel(logrus.DebugLevel)
		hook := logtest.NewLocal(log)
		d := &Daemon{cfg: Config{LogLevel: tt.level, Log: logrus.NewEntry(log)}, warn: lograte.New(warnBurst, warnInterval)}
		for range 1000 {
			d.logLine(d.cfg.Log, tt.line)
		}
		var warned, debug int
		for _, e := range hook.AllEntries() {
			switch e.Level {
			case logrus.WarnLevel:
				warned++
			case logrus.DebugLevel:
				debug++
			}
		}
		wantDebug := 1000
		if tt.warnings > 0 {
			wantDebug = 0 // the rest are counted, not logged
		}
		if warned != tt.warnings || debug != wantDebug {
			t.Errorf("%s at level %s: %d warnings and %d debug lines of 1000, want %d warnings", tt.line, tt.level, warned, debug, tt.warnings)
		}
		if n := d.warn.Flush(); n != 1000-tt.warnings && tt.warnings > 0 {
			t.Errorf("%s: %d suppressed, want %d", tt.line, n, 1000-tt.warnings)
		}
	}
}
