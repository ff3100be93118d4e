package agent

import (
	"context"
	"fmt"
	"os"

	"github.com/sirupsen/logrus"
)

// Init prepares a freshly booted guest for the agent: mounts the base file
// systems, moves log to the console at the level the kernel command line
// asks for, loads the kernel modules of the image's module list and starts
// reaping orphans (until ctx is done), and mounts the host's shared
// directory when there is one. An error leaves the guest unusable. The
// reaper is returned for whoever starts children and waits for them.
func Init(ctx context.Context, log *logrus.Logger) (*Reaper, error) {
	entry := logrus.NewEntry(log)
	if err := MountAll(entry, BaseMounts()); err != nil {
		return nil, fmt.Errorf("mount base file systems: %w", err)
	}

	// The console stays open for the agent's whole life.
	if console, err := OpenConsole(ConsolePath); err != nil {
		entry.WithError(err).Warn("logging to stderr")
	} else {
		log.SetOutput(console)
	}

	cmdline, err := os.ReadFile("/proc/cmdline")
	if err != nil {
		return nil, fmt.Errorf("read kernel command line: %w", err)
	}
	level, err := ParseKernelCmdline(string(cmdline)).LogLevel()
	if err != nil {
		entry.WithError(err).Warnf("ignoring %s", CmdlineLogLevel)
	}
	log.SetLevel(level)
	entry.WithField("count", len(BaseMounts())).Debug("base file systems mounted")

	if err := LoadModules(entry, ModuleListPath, ModuleDir); err != nil {
		return nil, err
	}
	reaper := StartReaper(ctx, entry)
	if _, err := MountShared(entry, SharedTag, SharedDir); err != nil {
		return nil, err
	}
	return reaper, nil
}
