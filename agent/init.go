package agent

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"sync"
	"time"

	"github.com/sirupsen/logrus"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/kiln-runtime/kiln/agent/network"
	"github.com/kiln-runtime/kiln/kernfs"
	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
)

// Guest is a guest that Init has prepared far enough for the agent API, with
// the rest of its setup going on in the background.
type Guest struct {
	// Reaper reaps orphans; whoever starts children and waits for them must
	// coordinate with it.
	Reaper *Reaper
	// Threads keeps threads back from the containers for the guest itself; the guest's setup sets it up.
	Threads *GuestThreads

	proceed     chan struct{}
	proceedOnce sync.Once
	done        chan struct{}
	err         error // set before done is closed

	// template: the guest boots to be saved as a template (agentv1.CmdlineTemplate); its shared directory is
	// mounted by Restored, not by the setup above.
	template    bool
	log         *logrus.Entry
	mountShared func() (bool, error)
	// zeroFree zeroes the guest's free memory before a template's save (zeroFreeInChild), and returns the bytes.
	zeroFree    func(ctx context.Context) (int64, error)
	restoreOnce sync.Once
	restored    chan struct{}
	restoreErr  error // set before restored is closed
}

// lateSetupDelay is how long the background setup waits for Proceed. Under
// emulation the host's first request comes some tens of milliseconds after
// the API listens; the guest has a single CPU then, and setup work running
// beside that request would only delay its answer.
const lateSetupDelay = 500 * time.Millisecond

// initramfsInit is the agent's binary in the initramfs, which the kernel runs as PID 1.
const initramfsInit = "/init"

// Init prepares a freshly booted guest for the agent API, which must answer
// as soon as possible after boot: it leaves the initramfs (LeaveInitramfs), mounts the base file systems the API
// needs, moves log to the console at the level the kernel command line asks
// for and starts reaping orphans (until ctx is done). The guest kernel has
// every driver built in, so there are no modules to load. The other base file
// systems and the host's shared directory follow in the background once
// the API has answered (Guest.Proceed); Guest.Ready waits for them. An error
// leaves the guest unusable.
func Init(ctx context.Context, log *logrus.Logger) (*Guest, error) {
	entry := logrus.NewEntry(log)
	start := time.Now()
	reexecuted := fromImage()
	if !reexecuted {
		if err := LeaveInitramfs(); err != nil {
			return nil, err
		}
	}
	earlyMounts, lateMounts := SplitMounts(BaseMounts())
	if err := MountAll(entry, earlyMounts); err != nil {
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
	params := ParseKernelCmdline(string(cmdline))
	level, err := params.LogLevel()
	if err != nil {
		entry.WithError(err).Warnf("ignoring %s", CmdlineLogLevel)
	}
	log.SetLevel(level)
	// libcontainer logs through logrus's standard logger: its messages go where the agent's do, at the same level.
	std := logrus.StandardLogger()
	std.SetOutput(log.Out)
	std.SetFormatter(log.Formatter)
	std.SetLevel(level)
	entry.WithFields(logrus.Fields{"count": len(earlyMounts), "took": time.Since(start)}).Debug("early file systems mounted")

	template := params.Flag(agentv1.CmdlineTemplate)
	switch {
	case reexecuted:
		// Nothing maps the initramfs's copy of the binary any more: removed, its pages are not saved with the
		// template (zeroFreeMemory zeroes them).
		if err := os.Remove(initramfsInit); err != nil {
			entry.WithError(err).Warn("remove the initramfs's copy of the agent")
		}
	case template && params.Flag(agentv1.CmdlineAgentImage):
		if err := runFromImage(entry); err != nil {
			entry.WithError(err).Warn("the agent runs from the initramfs")
		}
	}
	g := newGuest(entry, template)
	g.Reaper = StartReaper(ctx, entry)
	if g.template {
		// No host request comes before the save: nothing to wait for.
		g.Proceed()
	}
	go func() {
		defer close(g.done)
		t := time.NewTimer(lateSetupDelay)
		select {
		case <-g.proceed:
		case <-t.C:
		case <-ctx.Done():
			g.err = fmt.Errorf("guest setup: %w", ctx.Err())
			return
		}
		t.Stop()
		g.err = finishInit(entry, lateMounts, !g.template, g.Threads)
		if g.err != nil {
			entry.WithError(g.err).Error("guest setup failed; containers are unavailable")
		}
	}()
	return g, nil
}

// A container's processes get the shim's hard limit on open files (rlimit.Inherited), which its host allows up to
// its own fs.nr_open: systemd raises that to about 2^30, far above the kernel's default of 1048576 that the guest
// starts with, and a limit above the guest's would fail the container's start. The guest takes the kernel's
// ceiling (sysctl_nr_open_max on 64-bit), which no host exceeds: it bounds only what a process may ask for.
const (
	nrOpenFile = "/proc/sys/fs/nr_open"
	nrOpenMax  = 2147483584
)

// The kernel sets the guest's limit on open files at boot, about a tenth of its RAM in KiB (some 25,000 files
// in 256 MiB), and never raises it as memory is added; past it only CAP_SYS_ADMIN opens files or sockets. One
// container could then take the pod's every file, and a server of many connections fails in a VM of gigabytes.
// The guest takes what systemd gives a host, no limit: each container's files are charged to its memory cgroup.
const (
	fileMaxFile = "/proc/sys/fs/file-max"
	fileMax     = "9223372036854775807"
)

// finishInit is the part of the guest's setup that the agent API does not
// need: the other base file systems, the shared directory (when share is
// true) and the threads kept back from containers.
func finishInit(log *logrus.Entry, mounts []Mount, share bool, threads *GuestThreads) error {
	start := time.Now()
	if err := MountAll(log, mounts); err != nil {
		return fmt.Errorf("mount base file systems: %w", err)
	}
	if share {
		if _, err := MountShared(log, SharedTag, SharedDir); err != nil {
			return err
		}
	}
	if err := loopbackUp(); err != nil {
		return err
	}
	// Without the reserve, a container forking until refused would end the agent and the pod: the guest
	// cannot be run without it.
	if err := threads.Reserve(); err != nil {
		return err
	}
	if err := kernfs.Write(nrOpenFile, strconv.Itoa(nrOpenMax)); err != nil {
		log.WithError(err).Warn("raise the guest's ceiling on open files; a container's hard limit above 1048576 is refused")
	}
	if err := kernfs.Write(fileMaxFile, fileMax); err != nil {
		log.WithError(err).Warn("lift the guest's limit on open files; the pod's containers share about a tenth of its boot RAM in KiB")
	}
	log.WithFields(logrus.Fields{"mounts": len(mounts), "took": time.Since(start)}).Debug("guest setup complete")
	return nil
}

// Proceed lets the background part of Init start now rather than after
// lateSetupDelay: the agent calls it once the API has answered its first
// request. It may be called any number of times.
func (g *Guest) Proceed() {
	g.proceedOnce.Do(func() {
		close(g.proceed)
	})
}

// Ready waits until the background part of Init is done and returns its
// error, or ctx's error when ctx ends first. It starts that part at once if
// it has not started yet. A template guest is ready only once restored
// (Restored).
func (g *Guest) Ready(ctx context.Context) error {
	if err := g.setupDone(ctx); err != nil {
		return err
	}
	if !g.template {
		return nil
	}
	select {
	case <-g.restored:
		return g.restoreErr
	case <-ctx.Done():
		return fmt.Errorf("wait for the restored guest's shared directory: %w", ctx.Err())
	}
}

// setupDone waits for the background part of Init, starting it at once.
func (g *Guest) setupDone(ctx context.Context) error {
	g.Proceed()
	select {
	case <-g.done:
		return g.err
	case <-ctx.Done():
		return fmt.Errorf("wait for guest setup: %w", ctx.Err())
	}
}

// loopbackUp brings up lo in the guest's own network namespace; each pod namespace brings up its own.
func loopbackUp() error {
	h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return fmt.Errorf("netlink: %w", err)
	}
	defer h.Close()
	return network.LoopbackUp(h)
}
