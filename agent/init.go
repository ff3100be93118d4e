package agent

import (
	"context"
	"fmt"
	"os"
	"runtime"
	"time"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"
)

// Guest is a guest that Init has prepared far enough for the agent API, with
// the rest of its setup going on in the background.
type Guest struct {
	// Reaper reaps orphans; whoever starts children and waits for them must
	// coordinate with it.
	Reaper *Reaper

	done chan struct{}
	err  error // set before done is closed
}

// Init prepares a freshly booted guest for the agent API, which must answer
// as soon as possible after boot: it mounts the base file systems, moves log
// to the console at the level the kernel command line asks for, loads the
// kernel modules vsock needs and starts reaping orphans (until ctx is done).
// The remaining modules of the image's list and the host's shared directory
// follow in the background; Guest.Ready waits for them. An error leaves the
// guest unusable.
func Init(ctx context.Context, log *logrus.Logger) (*Guest, error) {
	entry := logrus.NewEntry(log)
	start := time.Now()
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
	entry.WithFields(logrus.Fields{"count": len(BaseMounts()), "took": time.Since(start)}).Debug("base file systems mounted")

	modules, err := ReadModuleList(ModuleListPath)
	if err != nil {
		return nil, err
	}
	early, late := SplitModules(modules, VsockTransportModule)
	start = time.Now()
	if err := LoadModuleFiles(entry, ModuleDir, early); err != nil {
		return nil, err
	}
	entry.WithFields(logrus.Fields{"count": len(early), "took": time.Since(start)}).Debug("vsock modules ready")

	g := &Guest{Reaper: StartReaper(ctx, entry), done: make(chan struct{})}
	go func() {
		defer close(g.done)
		idlePriority(entry)
		g.err = finishInit(entry, late)
		if g.err != nil {
			entry.WithError(g.err).Error("guest setup failed; containers are unavailable")
		}
	}()
	return g, nil
}

// finishInit is the part of the guest's setup that the agent API does not
// need: the other kernel modules and the shared directory.
func finishInit(log *logrus.Entry, modules []string) error {
	start := time.Now()
	if err := LoadModuleFiles(log, ModuleDir, modules); err != nil {
		return err
	}
	if _, err := MountShared(log, SharedTag, SharedDir); err != nil {
		return err
	}
	log.WithFields(logrus.Fields{"modules": len(modules), "took": time.Since(start)}).Debug("guest setup complete")
	return nil
}

// Ready waits until the background part of Init is done and returns its
// error, or ctx's error when ctx ends first.
func (g *Guest) Ready(ctx context.Context) error {
	select {
	case <-g.done:
		return g.err
	case <-ctx.Done():
		return fmt.Errorf("wait for guest setup: %w", ctx.Err())
	}
}

// ReadyGuest is a Guest whose setup is complete: for programs that prepare
// the guest themselves, and for tests.
func ReadyGuest(reaper *Reaper, err error) *Guest {
	g := &Guest{Reaper: reaper, done: make(chan struct{}), err: err}
	close(g.done)
	return g
}

// idlePriority moves the calling goroutine to an OS thread of its own that
// the kernel runs only when nothing else wants the CPU (SCHED_IDLE): the
// background setup must not slow the agent API down while the host makes its
// first requests. The goroutine must end without unlocking, which ends the
// thread too, so that the policy cannot pass to other goroutines.
func idlePriority(log *logrus.Entry) {
	runtime.LockOSThread()
	if err := unix.SchedSetAttr(0, &unix.SchedAttr{Policy: unix.SCHED_IDLE}, 0); err != nil {
		log.WithError(err).Debug("background setup at normal priority")
	}
}
