package agent

import (
	"context"
	"fmt"
	"io"
	"path/filepath"
	"time"

	"github.com/sirupsen/logrus"

	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
)

// Bounds of a restored template guest's wait for its hot-plugged virtio-fs device. The host adds the device
// before the guest runs again, but the guest binds it asynchronously (ACPI event, PCI scan, virtio probe):
// under emulation that was seen to take up to a few milliseconds after the agent's first answer.
const (
	sharedWaitTimeout  = 10 * time.Second
	sharedWaitInterval = 5 * time.Millisecond
)

// newGuest is a guest whose background setup has not run yet.
func newGuest(log *logrus.Entry, template bool) *Guest {
	g := &Guest{
		proceed:  make(chan struct{}),
		done:     make(chan struct{}),
		template: template,
		log:      log,
		restored: make(chan struct{}),
		Threads: &GuestThreads{
			ThreadsMax:   "/proc/sys/kernel/threads-max",
			PidMax:       "/proc/sys/kernel/pid_max",
			Meminfo:      "/proc/meminfo",
			PossibleCPUs: "/sys/devices/system/cpu/possible",
			Containers:   filepath.Join(CgroupMount, ContainersCgroup),
		},
	}
	g.mountShared = func() (bool, error) { return MountShared(log, SharedTag, SharedDir) }
	g.zeroFree = func(ctx context.Context) (int64, error) { return zeroFreeInChild(ctx, g.Reaper) }
	return g
}

// Template reports whether the guest boots to be saved as a template (agentv1.CmdlineTemplate).
func (g *Guest) Template() bool { return g.template }

// AnnounceTemplate writes agentv1.TemplateReadyLine to console once the guest's setup is done, so that the host
// may save the guest; a failed setup is logged instead, and the host, which sees no line, saves nothing. It
// returns when it has written or ctx has ended.
func (g *Guest) AnnounceTemplate(ctx context.Context, console io.Writer) {
	if err := g.setupDone(ctx); err != nil {
		g.log.WithError(err).Error("template guest not ready; it must not be saved")
		return
	}
	start := time.Now()
	if n, err := g.zeroFree(ctx); err != nil {
		// Saved all the same: its clones copy more of it.
		g.log.WithError(err).Warn("the template guest's free memory is not all zeros")
	} else {
		g.log.WithFields(logrus.Fields{"bytes": n, "took": time.Since(start)}).Debug("the template guest's free memory zeroed")
	}
	if _, err := fmt.Fprintln(console, agentv1.TemplateReadyLine); err != nil {
		g.log.WithError(err).Error("announce the template guest")
	}
}

// Restored finishes the setup of a guest restored from a template: it waits (bounded) for the virtio-fs device
// the host hot-plugged and mounts the shared directory. A guest booted normally has nothing to do. It runs
// once; later calls return the first call's result. The host calls it through SeedGuest, which a restored guest
// needs first anyway.
func (g *Guest) Restored(ctx context.Context) error {
	if !g.template {
		return nil
	}
	if err := g.setupDone(ctx); err != nil {
		return err
	}
	g.restoreOnce.Do(func() {
		g.restoreErr = waitShared(ctx, sharedWaitTimeout, sharedWaitInterval, g.mountShared)
		close(g.restored)
	})
	return g.restoreErr
}

// waitShared calls mount until it reports the share mounted, fails, or timeout passes.
func waitShared(ctx context.Context, timeout, interval time.Duration, mount func() (bool, error)) error {
	start := time.Now()
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	for {
		ok, err := mount()
		if err != nil {
			return fmt.Errorf("mount the shared directory after the restore: %w", err)
		}
		if ok {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("mount the shared directory after the restore: no virtio-fs device with tag %s after %s: %w",
				SharedTag, time.Since(start).Round(time.Millisecond), ctx.Err())
		case <-time.After(interval):
		}
	}
}
