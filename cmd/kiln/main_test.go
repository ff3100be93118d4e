package main

import (
	"bytes"
	"io"
	"os"
	"strings"
	"testing"

	"github.com/sirupsen/logrus"
)

// Lines a guest can make ttrpc's client log as often as it likes are bounded in every kiln command, with or
// without --debug, as in the shim: `kiln run` and `kiln vm boot` hold an agent connection too.
func TestCommandsBoundGuestNoise(t *testing.T) {
	l := logrus.StandardLogger()
	formatter, level := l.Formatter, l.Level
	t.Cleanup(func() {
		l.SetFormatter(formatter)
		l.SetLevel(level)
		l.SetOutput(os.Stderr)
	})
	for _, args := range [][]string{{"version"}, {"--debug", "version"}} {
		t.Run(strings.Join(args, " "), func(t *testing.T) {
			l.SetFormatter(&logrus.TextFormatter{})
			root := newRoot()
			root.SetArgs(append([]string{"--config", "/nonexistent/kiln.toml"}, args...))
			root.SetOut(io.Discard)
			if err := root.Execute(); err != nil {
				t.Fatal(err)
			}
			var out bytes.Buffer
			l.SetOutput(&out)
			for range 100 {
				l.Error("ttrpc: received message on inactive stream")
			}
			l.Info("kiln's own line")
			if n := strings.Count(out.String(), "inactive stream"); n > 20 {
				t.Errorf("%d of 100 lines of the guest's noise logged: not bounded", n)
			}
			if !strings.Contains(out.String(), "kiln's own line") {
				t.Errorf("kiln's own line was not logged:\n%s", out.String())
			}
		})
	}
}
