// Package virtiofs runs virtiofsd, the vhost-user backend of a VM's virtio-fs device, as a child of Kiln: it
// creates the vhost-user socket, starts the daemon on it, waits until the daemon accepts connections, logs what it
// writes, and stops it (and removes the socket) however the VM ends. It knows nothing of QEMU's command line, of
// what is in the exported directory, or of containers.
//
// The daemon is Debian's C virtiofsd of QEMU 7.2 (package qemu-system-common).
package virtiofs

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"sync"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/kiln-runtime/kiln/vm/tail"
	"golang.org/x/sys/unix"
)

// DefaultBinary is where Debian installs virtiofsd.
const DefaultBinary = "/usr/lib/qemu/virtiofsd"

// Tag is the virtio-fs tag the guest mounts the shared directory by.
const Tag = "kiln-shared"

// Cache is virtiofsd's cache mode: how long the guest may trust what it cached of the host's files.
type Cache string

// Cache modes of virtiofsd.
const (
	// CacheAuto revalidates cached data after a timeout and on open: host changes show up within a second.
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
	// Xattr passes extended attributes through (file capabilities, overlay in the guest).
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
}

// BinaryHelp says how to get a missing virtiofsd; errors about the binary end with it.
const BinaryHelp = "install it (apt-get install qemu-system-common) or set shared_fs.virtiofsd in Kiln's config"

// Daemon is a running virtiofsd. Start creates it; Stop ends it.
type Daemon struct {
	cfg    Config
	cmd    *exec.Cmd
	stderr *tail.Buffer
	logged chan struct{} // closed when stderr has been read to its end

	exited  chan struct{} // closed when the process has been reaped
	exitErr error

	stopOnce sync.Once
	stopErr  error
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

	stderrR, stderrW, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("start virtiofsd: stderr pipe: %w", err)
	}
	d := &Daemon{
		cfg:    cfg,
		stderr: tail.New(8 << 10),
		logged: make(chan struct{}),
		exited: make(chan struct{}),
	}
	cmd := exec.Command(bin, args(cfg)...)
	cmd.Stdin = nil
	cmd.Stdout = nil
	cmd.Stderr = stderrW
	cmd.ExtraFiles = []*os.File{lf}
	// virtiofsd must not outlive Kiln, even when Kiln is killed with SIGKILL. Its own process group lets Stop
	// reach the child it forks into a new PID namespace.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	cfg.Log.WithField("args", cmd.Args).Debug("starting virtiofsd")
	err = cmd.Start()
	stderrW.Close()
	if err != nil {
		stderrR.Close()
		return nil, fmt.Errorf("start virtiofsd: run %s: %w", bin, err)
	}
	d.cmd = cmd
	d.cfg.Log = cfg.Log.WithField("pid", cmd.Process.Pid)
	go d.logStderr(stderrR)
	go d.reap()
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

func (d *Daemon) reap() {
	err := d.cmd.Wait()
	<-d.logged
	d.exitErr = err
	close(d.exited)
}

// PID is virtiofsd's process id.
func (d *Daemon) PID() int { return d.cmd.Process.Pid }

// SocketPath is the vhost-user socket QEMU connects to.
func (d *Daemon) SocketPath() string { return d.cfg.SocketPath }

// Exited is closed once virtiofsd has exited.
func (d *Daemon) Exited() <-chan struct{} { return d.exited }

// ExitError says how virtiofsd ended, with the last lines it wrote; nil while it runs.
func (d *Daemon) ExitError() error {
	select {
	case <-d.exited:
	default:
		return nil
	}
	if d.exitErr == nil {
		return fmt.Errorf("virtiofsd exited%s", d.Diagnostics())
	}
	return fmt.Errorf("virtiofsd exited: %v%s", d.exitErr, d.Diagnostics())
}

// Diagnostics is the tail of virtiofsd's stderr, formatted to be appended to an error; empty when it wrote
// nothing.
func (d *Daemon) Diagnostics() string {
	if s := bytes.TrimSpace(d.stderr.Bytes()); len(s) > 0 {
		return fmt.Sprintf("\nvirtiofsd stderr:\n%s", s)
	}
	return ""
}

// Stop ends virtiofsd: SIGTERM to its process group, SIGKILL after StopTimeout or when ctx ends, then it waits
// for the process and removes the socket. Safe to call more than once and after virtiofsd exited on its own
// (it does when QEMU disconnects).
func (d *Daemon) Stop(ctx context.Context) error {
	d.stopOnce.Do(func() { d.stopErr = d.stop(ctx) })
	return d.stopErr
}

func (d *Daemon) stop(ctx context.Context) error {
	d.signalGroup(unix.SIGTERM)
	t := time.NewTimer(d.cfg.StopTimeout)
	defer t.Stop()
	select {
	case <-d.exited:
	case <-t.C:
		d.cfg.Log.Warn("virtiofsd did not stop in time; killing it")
	case <-ctx.Done():
	}
	// The group may still hold the sandboxed child even when the parent has gone.
	d.signalGroup(unix.SIGKILL)
	<-d.exited
	if err := os.Remove(d.cfg.SocketPath); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("stop virtiofsd: remove socket: %w", err)
	}
	return nil
}

// signalGroup signals virtiofsd's process group. The group id is the leader's pid, which cannot be reused
// while the leader is unreaped; once it has been reaped only stragglers could remain, and they die with
// their parent (virtiofsd gives its sandboxed child a parent-death signal).
func (d *Daemon) signalGroup(sig unix.Signal) {
	select {
	case <-d.exited:
		return
	default:
	}
	if err := unix.Kill(-d.cmd.Process.Pid, sig); err != nil && !errors.Is(err, unix.ESRCH) {
		d.cfg.Log.WithError(err).Debugf("signal virtiofsd with %v", sig)
	}
}
