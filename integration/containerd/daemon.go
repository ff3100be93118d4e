package containerd

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// Namespace is the containerd namespace the harness works in.
const Namespace = "kiln-test"

// Options describe a private containerd.
type Options struct {
	Tools Tools
	// Path lists directories put first on containerd's PATH, which is where containerd finds shim binaries
	// (containerd-shim-kiln-v2) and the runc shim finds runc.
	Path []string
	// Env is added to containerd's environment, and so to every shim's.
	Env []string
	// Debug logs containerd and shims at debug level.
	Debug bool
	// CRI enables containerd's CRI plugin with this configuration; nil leaves CRI disabled.
	CRI *CRIConfig
}

// Daemon is a running private containerd.
type Daemon struct {
	Dir     string
	Address string
	LogPath string
	opts    Options
	cmd     *exec.Cmd
	exited  chan struct{}
	waitErr error
}

// Start runs a containerd whose every path is under a fresh temporary directory, and waits until it answers.
func Start(ctx context.Context, opts Options) (*Daemon, error) {
	// Shim socket paths are derived from the address and must stay under the 108-byte limit: keep it short.
	dir, err := os.MkdirTemp("", "kctrd-")
	if err != nil {
		return nil, fmt.Errorf("create containerd dir: %w", err)
	}
	d := &Daemon{Dir: dir, Address: filepath.Join(dir, "c.sock"), LogPath: filepath.Join(dir, "containerd.log"), opts: opts}
	if err := d.start(ctx); err != nil {
		_ = d.Stop(context.WithoutCancel(ctx))
		return nil, err
	}
	return d, nil
}

// configTOML is containerd's configuration: nothing global (no NRI socket, no /opt, no shim sockets in
// /run/containerd/s, CRI only when Options.CRI asks for it), every path in dir.
func (d *Daemon) configTOML() string {
	level := "info"
	if d.opts.Debug {
		level = "debug"
	}
	criPlugins := `
  "io.containerd.grpc.v1.cri",
  "io.containerd.cri.v1.runtime",
  "io.containerd.cri.v1.images",`
	if d.opts.CRI != nil {
		criPlugins = ""
	}
	return fmt.Sprintf(`version = 3
root = %[1]q
state = %[2]q
disabled_plugins = [%[7]s
  "io.containerd.nri.v1.nri",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.blockfile",
  "io.containerd.snapshotter.v1.erofs",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
]

[grpc]
  address = %[3]q

[ttrpc]
  address = %[4]q

[debug]
  level = %[5]q

[plugins."io.containerd.internal.v1.opt"]
  path = %[6]q

[plugins."io.containerd.shim.v1.manager"]
  socket_dir = %[9]q
%[8]s`, filepath.Join(d.Dir, "root"), filepath.Join(d.Dir, "state"), d.Address, d.Address+".ttrpc", level,
		filepath.Join(d.Dir, "opt"), criPlugins, d.criTOML(), d.SocketDir())
}

// SocketDir is the directory containerd tells its shims to put their sockets in (socket_dir, from containerd
// 2.3; older ones ignore it and use their default, /run/containerd/s).
func (d *Daemon) SocketDir() string { return filepath.Join(d.Dir, "s") }

func (d *Daemon) start(ctx context.Context) error {
	cfg := filepath.Join(d.Dir, "config.toml")
	if d.opts.CRI != nil {
		if err := os.MkdirAll(d.CRIRegistryDir(), 0o755); err != nil {
			return fmt.Errorf("create CRI registry config dir: %w", err)
		}
	}
	if err := os.WriteFile(cfg, []byte(d.configTOML()), 0o644); err != nil {
		return fmt.Errorf("write containerd config: %w", err)
	}
	logf, err := os.OpenFile(d.LogPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("open containerd log: %w", err)
	}
	defer logf.Close()
	cmd := exec.Command(d.opts.Tools.Containerd, "--config", cfg)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Env = d.env()
	// Its own process group, so a terminal's Ctrl-C reaches only the test, which then stops containerd.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start containerd: %w", err)
	}
	d.cmd = cmd
	d.exited = make(chan struct{})
	go func() {
		d.waitErr = cmd.Wait()
		close(d.exited)
	}()
	return d.waitReady(ctx)
}

// env is containerd's environment: the harness's, with the tool and shim directories first on PATH.
func (d *Daemon) env() []string {
	path := append(append([]string{}, d.opts.Path...), d.opts.Tools.Dir)
	path = append(path, os.Getenv("PATH"))
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "PATH=") {
			env = append(env, kv)
		}
	}
	env = append(env, "PATH="+strings.Join(path, ":"))
	return append(env, d.opts.Env...)
}

func (d *Daemon) waitReady(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	for {
		if _, err := os.Stat(d.Address); err == nil {
			if _, err := d.Ctr(ctx, "version"); err == nil {
				return nil
			}
		}
		select {
		case <-d.exited:
			return fmt.Errorf("containerd exited while starting (%v):\n%s", d.waitErr, d.LogTail(40))
		case <-ctx.Done():
			return fmt.Errorf("containerd did not answer on %s: %w\n%s", d.Address, ctx.Err(), d.LogTail(40))
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// Restart stops containerd (SIGTERM, leaving shims and their tasks running) and starts it again with the same
// root, state and sockets.
func (d *Daemon) Restart(ctx context.Context) error {
	if err := d.stopDaemon(ctx); err != nil {
		return err
	}
	return d.start(ctx)
}

// Pid is containerd's pid.
func (d *Daemon) Pid() int { return d.cmd.Process.Pid }

// CtrCommand builds a ctr command against this containerd, in the harness's namespace.
func (d *Daemon) CtrCommand(ctx context.Context, args ...string) *exec.Cmd {
	return d.ctrCommandIn(ctx, Namespace, args...)
}

func (d *Daemon) ctrCommandIn(ctx context.Context, namespace string, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, d.opts.Tools.Ctr, append([]string{"--address", d.Address, "--namespace", namespace}, args...)...)
	cmd.Env = d.env()
	cmd.WaitDelay = 5 * time.Second
	return cmd
}

// Ctr runs ctr and returns its standard output; the error carries its standard error.
func (d *Daemon) Ctr(ctx context.Context, args ...string) (string, error) {
	return d.CtrIn(ctx, Namespace, args...)
}

// CtrIn is Ctr in another containerd namespace (CRINamespace for what CRI sees).
func (d *Daemon) CtrIn(ctx context.Context, namespace string, args ...string) (string, error) {
	cmd := d.ctrCommandIn(ctx, namespace, args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	if err != nil {
		return stdout.String(), fmt.Errorf("ctr %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
}

// LogTail returns the last n lines of containerd's log (which holds the shims' logs too).
func (d *Daemon) LogTail(n int) string {
	b, err := os.ReadFile(d.LogPath)
	if err != nil {
		return ""
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// KeepLogs copies containerd's whole log, and the guest console logs (console.log and its rotated console.log.1)
// found under d's Kiln state directory and under dirs, to a new directory below the system's temporary one, and
// returns its path. It is for a failed test, before the harness removes its directories: the shims' logs are in
// containerd's, and a VM's console is removed with the VM.
func (d *Daemon) KeepLogs(name string, dirs ...string) (string, error) {
	name = strings.Map(func(r rune) rune {
		if r == '/' || r == ' ' {
			return '_'
		}
		return r
	}, name)
	keep, err := os.MkdirTemp("", "kiln-failed-"+name+"-")
	if err != nil {
		return "", fmt.Errorf("keep logs: %w", err)
	}
	var errs []error
	if err := copyFile(d.LogPath, filepath.Join(keep, "containerd.log")); err != nil {
		errs = append(errs, err)
	}
	for _, dir := range append([]string{d.StateDir()}, dirs...) {
		// The walk goes on past what a stopping VM removes under it meanwhile.
		_ = filepath.WalkDir(dir, func(p string, e os.DirEntry, err error) error {
			if err != nil || e.IsDir() || !strings.HasPrefix(e.Name(), "console.log") {
				return nil
			}
			rel, _ := filepath.Rel(dir, p)
			dst := filepath.Join(keep, filepath.Base(dir), rel)
			if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
				errs = append(errs, err)
				return nil
			}
			if err := copyFile(p, dst); err != nil && !errors.Is(err, os.ErrNotExist) {
				errs = append(errs, err)
			}
			return nil
		})
	}
	return keep, errors.Join(errs...)
}

func copyFile(src, dst string) error {
	b, err := os.ReadFile(src)
	if err != nil {
		return fmt.Errorf("keep logs: %w", err)
	}
	if err := os.WriteFile(dst, b, 0o644); err != nil {
		return fmt.Errorf("keep logs: %w", err)
	}
	return nil
}

func (d *Daemon) stopDaemon(ctx context.Context) error {
	if d.cmd == nil {
		return nil
	}
	select {
	case <-d.exited:
		return nil
	default:
	}
	_ = d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.exited:
	case <-time.After(10 * time.Second):
		_ = d.cmd.Process.Kill()
		<-d.exited
	case <-ctx.Done():
		_ = d.cmd.Process.Kill()
		<-d.exited
	}
	return nil
}

// Stop kills every task left in the namespace, stops containerd, ends any shim it left behind, unmounts what
// is mounted under its directory and removes it. It reports what it had to clean up by force, and shim sockets
// left behind, so a test can treat leftovers as failures.
func (d *Daemon) Stop(ctx context.Context) error {
	var errs []error
	if d.cmd != nil {
		select {
		case <-d.exited:
		default:
			if left := d.cleanupTasks(ctx); left != nil {
				errs = append(errs, left)
			}
		}
	}
	_ = d.stopDaemon(ctx)
	if err := StopSpare(d.Address, time.Minute); err != nil {
		errs = append(errs, err)
	}
	if err := removeFailedSpare(d.Address); err != nil {
		errs = append(errs, err)
	}
	// A shim tears its VM down after it answered Shutdown: give it the time that takes.
	if pids := d.WaitShimsGone(ctx, shimExitTimeout); len(pids) > 0 {
		errs = append(errs, fmt.Errorf("shims still running after containerd stopped: %v", pids))
		for _, pid := range pids {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
	// A shim removes its socket as it ends; containerd's `delete` removes a dead one's.
	if entries, err := os.ReadDir(d.SocketDir()); err == nil && len(entries) > 0 {
		var names []string
		for _, e := range entries {
			names = append(names, e.Name())
		}
		errs = append(errs, fmt.Errorf("shim sockets left in %s: %v", d.SocketDir(), names))
	}
	if err := unmountUnder(d.Dir); err != nil {
		errs = append(errs, err)
	}
	if err := os.RemoveAll(d.Dir); err != nil {
		errs = append(errs, fmt.Errorf("remove %s: %w", d.Dir, err))
	}
	return errors.Join(errs...)
}

// cleanupTasks force-deletes every task and container (CRI's too, when CRI is on), returning an error naming
// those it found.
func (d *Daemon) cleanupTasks(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	namespaces := []string{Namespace}
	if d.opts.CRI != nil {
		namespaces = append(namespaces, CRINamespace)
	}
	var errs []error
	for _, ns := range namespaces {
		out, err := d.CtrIn(ctx, ns, "containers", "list", "--quiet")
		if err != nil {
			errs = append(errs, err)
			continue
		}
		ids := strings.Fields(out)
		for _, id := range ids {
			_, _ = d.CtrIn(ctx, ns, "tasks", "kill", "--signal", "SIGKILL", id)
			_, _ = d.CtrIn(ctx, ns, "tasks", "delete", "--force", id)
			_, _ = d.CtrIn(ctx, ns, "containers", "delete", id)
		}
		if len(ids) > 0 {
			errs = append(errs, fmt.Errorf("containers left behind in namespace %s: %v", ns, ids))
		}
	}
	return errors.Join(errs...)
}

// shimExitTimeout bounds the wait for shims to exit once their tasks are deleted.
const shimExitTimeout = 20 * time.Second

// WaitShimsGone waits until no shim of this containerd runs, or timeout passes, and returns those still running.
func (d *Daemon) WaitShimsGone(ctx context.Context, timeout time.Duration) []int {
	deadline := time.Now().Add(timeout)
	for {
		pids := d.Shims()
		if len(pids) == 0 || time.Now().After(deadline) || ctx.Err() != nil {
			return pids
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Shims lists the pids of shim processes serving this containerd's tasks (found by the address on their command
// line), leaving out the spare shim that waits for its next task.
func (d *Daemon) Shims() []int {
	return taskShims(d.Address, processesWithArg(d.Address))
}
