// Package virtiofs runs virtiofsd, the vhost-user backend of a VM's virtio-fs device, as a child of Kiln: it
// creates the vhost-user socket, starts the daemon on it, waits until the daemon accepts connections, logs what it
// writes, and stops it (and removes the socket) however the VM ends. It knows nothing of QEMU's command line, of
// what is in the exported directory, or of containers.
//
// The daemon is Debian's C virtiofsd of QEMU 7.2 (package qemu-system-common).
package virtiofs

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/kiln-runtime/kiln/lograte"
	"github.com/kiln-runtime/kiln/vm/child"
)

// DefaultBinary is where Debian installs virtiofsd.
const DefaultBinary = "/usr/lib/qemu/virtiofsd"

// Tag is the virtio-fs tag the guest mounts the shared directory by.
const Tag = "kiln-shared"

// Cache is virtiofsd's cache mode: how long the guest may trust what it cached of the host's files.
type Cache string

// Cache modes of virtiofsd.
const (
	// CacheAuto keeps what the guest cached of a file across opens and revalidates a file's metadata after a
	// second; the guest drops its cached data when the file's size or modification time changed, so host
	// changes show up within a second. (virtiofsd's own "auto" drops the cached data on every open, so the
	// guest reads an executable anew each time it runs it; see args.)
	CacheAuto Cache = "auto"
	// CacheAlways never revalidates: fastest, for trees only the guest changes.
	CacheAlways Cache = "always"
	// CacheNone caches nothing: every access reaches the host.
	CacheNone Cache = "none"
)

// Config describes one virtiofsd.
type Config struct {
	// Binary is virtiofsd (a path, or a name looked up in PATH); empty means DefaultBinary.
	Binary string
	// SourceDir is the directory exported to the guest. It must exist.
	SourceDir string
	// SocketPath is the vhost-user socket QEMU connects to. Start creates it, Stop removes it.
	SocketPath string
	// Cache is the cache mode; empty means CacheAuto.
	Cache Cache
	// Xattr passes file capabilities and user.* extended attributes through (xattrMap); others are refused.
	Xattr bool
	// ThreadPoolSize bounds virtiofsd's worker threads; 0 keeps its default.
	ThreadPoolSize int
	// ExtraArgs are appended to the command line as they are.
	ExtraArgs []string
	// LogLevel is virtiofsd's own log level (debug, info, warn, err); empty means warn, or info when Log is at
	// debug level.
	LogLevel string
	// ReadyTimeout bounds the wait until virtiofsd accepts connections; 0 means 10 s.
	ReadyTimeout time.Duration
	// StopTimeout bounds the wait after SIGTERM before virtiofsd is killed; 0 means 2 s.
	StopTimeout time.Duration
	// Log receives virtiofsd's stderr, one entry per line.
	Log *logrus.Entry
	// Cgroup, when set, is the cgroup virtiofsd (and the sandboxed child it forks) runs in.
	Cgroup *child.Cgroup
}

// BinaryHelp says how to get a missing virtiofsd; errors about the binary end with it.
const BinaryHelp = "install it (apt-get install qemu-system-common) or set shared_fs.virtiofsd in Kiln's config"

// Daemon is a running virtiofsd. Start creates it; Stop ends it.
type Daemon struct {
	cfg  Config
	proc *child.Process
	// warn bounds virtiofsd's warnings in the log: a guest can make it complain at the rate of its requests.
	warn *lograte.Limiter
}

// Start runs virtiofsd and returns once it accepts connections on cfg.SocketPath. On error nothing is left
// behind: no process, no socket.
func Start(ctx context.Context, cfg Config) (_ *Daemon, retErr error) {
	if cfg.Binary == "" {
		cfg.Binary = DefaultBinary
	}
	if cfg.Cache == "" {
		cfg.Cache = CacheAuto
	}
	if cfg.Log == nil {
		cfg.Log = logrus.NewEntry(logrus.StandardLogger())
	}
	if cfg.LogLevel == "" {
		cfg.LogLevel = "warn"
		if cfg.Log.Logger.IsLevelEnabled(logrus.DebugLevel) {
			cfg.LogLevel = "info"
		}
	}
	if cfg.ReadyTimeout <= 0 {
		cfg.ReadyTimeout = 10 * time.Second
	}
	if cfg.StopTimeout <= 0 {
		cfg.StopTimeout = 2 * time.Second
	}
	cfg.Log = cfg.Log.WithField("component", "virtiofsd")

	bin, err := exec.LookPath(cfg.Binary)
	if err != nil {
		return nil, fmt.Errorf("start virtiofsd: binary %q not found: %s: %w", cfg.Binary, BinaryHelp, err)
	}
	if fi, err := os.Stat(cfg.SourceDir); err != nil {
		return nil, fmt.Errorf("start virtiofsd: shared directory: %w", err)
	} else if !fi.IsDir() {
		return nil, fmt.Errorf("start virtiofsd: shared directory %s is not a directory", cfg.SourceDir)
	}
	if cfg.SocketPath == "" {
		return nil, errors.New("start virtiofsd: no socket path")
	}

	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: cfg.SocketPath, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("start virtiofsd: listen on vhost-user socket: %w", err)
	}
	// The socket file outlives Kiln's copy of the listener (virtiofsd holds the other); Stop removes it.
	l.SetUnlinkOnClose(false)
	defer func() {
		if retErr != nil {
			_ = os.Remove(cfg.SocketPath)
		}
	}()
	lf, err := l.File()
	l.Close()
	if err != nil {
		return nil, fmt.Errorf("start virtiofsd: vhost-user socket descriptor: %w", err)
	}
	// Kiln keeps no copy once virtiofsd has it: if virtiofsd dies, QEMU's connection fails instead of hanging.
	defer lf.Close()

	d := &Daemon{cfg: cfg, warn: lograte.New(warnBurst, warnInterval)}
	// virtiofsd forks a sandboxed child into a new PID namespace; vm/child runs virtiofsd in a process group of
	// its own, so Stop reaches that child too, and with a parent-death signal, so it does not outlive Kiln.
	proc, err := child.Start(child.Config{
		Name:        "virtiofsd",
		Path:        bin,
		Args:        args(cfg),
		ExtraFiles:  []*os.File{lf},
		StderrLine:  d.logLine,
		StopTimeout: cfg.StopTimeout,
		Log:         cfg.Log,
		Cgroup:      cfg.Cgroup,
	})
	if err != nil {
		return nil, fmt.Errorf("start virtiofsd: %w", err)
	}
	d.proc = proc
	d.cfg.Log = cfg.Log.WithField("pid", proc.PID())
	defer func() {
		if retErr != nil {
			_ = d.Stop(context.WithoutCancel(ctx))
		}
	}()

	if err := d.waitReady(ctx); err != nil {
		return nil, fmt.Errorf("start virtiofsd for %s: %w", cfg.SourceDir, err)
	}
	d.cfg.Log.Debug("virtiofsd ready")
	return d, nil
}

// PID is virtiofsd's process id.
func (d *Daemon) PID() int { return d.proc.PID() }

// Hold stops virtiofsd (on) or lets it go on (child.Process.Hold); Stop continues it first.
func (d *Daemon) Hold(on bool) { d.proc.Hold(on) }

// SocketPath is the vhost-user socket QEMU connects to.
func (d *Daemon) SocketPath() string { return d.cfg.SocketPath }

// Exited is closed once virtiofsd has exited.
func (d *Daemon) Exited() <-chan struct{} { return d.proc.Exited() }

// ExitError says how virtiofsd ended, with the last lines it wrote; nil while it runs.
func (d *Daemon) ExitError() error {
	err := d.proc.ExitError()
	if err == nil {
		return nil
	}
	return fmt.Errorf("%w%s", err, d.Diagnostics())
}

// Diagnostics is the tail of virtiofsd's stderr, formatted to be appended to an error; empty when it wrote
// nothing.
func (d *Daemon) Diagnostics() string { return d.proc.Diagnostics() }

// Stop ends virtiofsd: SIGTERM to its process group, SIGKILL after StopTimeout or when ctx ends, then it waits
// for the process and removes the socket. Safe to call more than once and after virtiofsd exited on its own
// (it does when QEMU disconnects).
func (d *Daemon) Stop(ctx context.Context) error {
	d.proc.Stop(ctx)
	if n := d.warn.Flush(); n > 0 {
		d.cfg.Log.WithField("suppressed", n).Warn("more of virtiofsd's warnings were not logged")
	}
	if err := os.Remove(d.cfg.SocketPath); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("stop virtiofsd: remove socket: %w", err)
	}
	return nil
}
