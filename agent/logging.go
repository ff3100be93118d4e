package agent

import (
	"fmt"
	"io"
	"os"
	"time"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"
)

// ConsolePath is where the agent logs once /dev is mounted: the kernel's
// console, which the host reads as the guest's serial output.
const ConsolePath = "/dev/console"

// NewLogger returns the agent's logger, writing to w (os.Stderr until the
// console is open: the kernel gives init the console as fds 0-2 when the
// initramfs has /dev/console).
func NewLogger(w io.Writer) *logrus.Logger {
	log := logrus.New()
	log.SetOutput(w)
	log.SetLevel(logrus.InfoLevel)
	log.SetFormatter(&logrus.TextFormatter{
		DisableColors:   true,
		FullTimestamp:   true,
		TimestampFormat: time.RFC3339Nano,
	})
	return log
}

// OpenConsole opens the console for writing. O_NOCTTY keeps PID 1 from taking
// the console as its controlling terminal, so a ^C typed on it signals no one.
func OpenConsole(path string) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_WRONLY|unix.O_NOCTTY, 0)
	if err != nil {
		return nil, fmt.Errorf("open console %s: %w", path, err)
	}
	return f, nil
}
