// Package child runs one helper program of a VM (QEMU, virtiofsd) as a child of Kiln: it starts the program in a
// process group of its own with a parent-death signal, hands it inherited descriptors, keeps the tail of what it
// writes to stderr for error messages, records how it exited, and stops it (a polite request, then SIGKILL to
// its group after a timeout); it can start the program as another user and inside a cgroup of Kiln's making
// (cgroup.go). It knows nothing of what the program is: no command lines, sockets, QMP or
// consoles; its callers own those.
package child

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"runtime"
	"sync"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"
)

// DefaultTailBytes is how much of a program's stderr is kept when Config.TailBytes is zero.
const DefaultTailBytes = 8 << 10

// ioWaitDelay is how long the program's exit waits for the end of its stdout and stderr before their pipes are
// closed (exec.Cmd.WaitDelay).
const ioWaitDelay = 2 * time.Second

// DefaultStopTimeout is how long Stop waits after its request to quit when Config.StopTimeout is zero.
const DefaultStopTimeout = 3 * time.Second

// maxLine bounds a stderr line handed to Config.StderrLine; a longer one is handed over in pieces.
const maxLine = 64 << 10

// Config describes one child program.
type Config struct {
	// Name names the program in errors and log entries ("QEMU", "virtiofsd").
	Name string
	// Path is the program; the caller has resolved it (exec.LookPath).
	Path string
	Args []string
	// Dir is the working directory; empty means Kiln's.
	Dir string
	// Env is added to Kiln's environment for the program.
	Env []string
	// ExtraFiles are inherited as descriptors 3, 4, ... in order. The caller keeps and closes its copies.
	ExtraFiles []*os.File
	// Stdout receives the program's stdout; nil discards it.
	Stdout io.Writer
	// StderrLine, when set, is called with each line the program writes to stderr, without its newline, in
	// order, from one goroutine; every call has returned before Exited is closed. log is Log with the program's
	// pid, for passing the line on.
	StderrLine func(log *logrus.Entry, line string)
	// TailBytes is how much of stderr Diagnostics quotes; 0 means DefaultTailBytes.
	TailBytes int
	// Quit asks the program to end (QEMU: QMP quit); nil means SIGTERM to its process group.
	Quit func(ctx context.Context) error
	// StopTimeout bounds the wait after Quit before Stop kills the program; 0 means DefaultStopTimeout.
	StopTimeout time.Duration
	// Log receives Kiln's own entries about the program (start, a stop that timed out).
	Log *logrus.Entry
	// Credential, when set, is the user, group and supplementary groups the program runs as; Kiln switches to
	// them between fork and exec, so the program never runs as Kiln's user (QEMU's own -runas would switch
	// after start, which its sandbox's elevateprivileges=deny forbids).
	Credential *syscall.Credential
	// Cgroup, when set, is the cgroup the program starts in, from its fork on.
	Cgroup *Cgroup
	// Batch starts the program with the SCHED_BATCH policy, which its threads inherit (a CPU-bound program that
	// need not preempt others when it wakes: QEMU under TCG; see startBatch).
	Batch bool
	// Confine, when set, restricts the thread that forks the program for good (vm/confine: a Landlock domain and
	// a seccomp filter), which the program inherits from its fork on. Start then forks from a thread of its own,
	// which it keeps until the program has exited (the parent-death signal is tied to it) and lets end after: no
	// other goroutine ever runs on it. Confine gets the files Start itself writes on that thread after it, which
	// it must leave writable: /dev/null when Stdout is nil. On cgroup v1 the thread enters the program's cgroup
	// before Confine, and is put back by another thread after the fork. An error fails the start.
	Confine func(writes []string) error
	// NoHugePages starts the program without transparent huge pages (PR_SET_THP_DISABLE), which its own children
	// inherit too. The kernel keeps the setting per process and copies it at the fork: Start sets it on Kiln's own
	// process, where it stays, so every program Kiln starts afterwards goes without them as well.
	NoHugePages bool
}

// Process is a running (or exited) child program. Start creates it.
type Process struct {
	cfg    Config
	cmd    *exec.Cmd
	log    *logrus.Entry
	stderr *tailBuffer
	lines  *lineWriter // nil without Config.StderrLine

	exited  chan struct{} // closed once the program is reaped and its output read to the end
	exitErr error         // written before exited is closed

	stopOnce sync.Once
}

// Start runs the program. Its parent-death signal is SIGKILL, so it does not outlive Kiln even when Kiln is
// killed with SIGKILL. (The kernel sends that signal when the thread that started the child ends; Go ends a
// thread only when a goroutine locked to it returns still locked, so such a goroutine must not call Start.)
func Start(cfg Config) (*Process, error) {
	if cfg.TailBytes <= 0 {
		cfg.TailBytes = DefaultTailBytes
	}
	if cfg.StopTimeout <= 0 {
		cfg.StopTimeout = DefaultStopTimeout
	}
	if cfg.Log == nil {
		cfg.Log = logrus.NewEntry(logrus.StandardLogger())
	}
	p := &Process{
		cfg:    cfg,
		stderr: newTailBuffer(cfg.TailBytes),
		exited: make(chan struct{}),
	}
	cmd := exec.Command(cfg.Path, cfg.Args...)
	cmd.Dir = cfg.Dir
	if len(cfg.Env) > 0 {
		cmd.Env = append(os.Environ(), cfg.Env...)
	}
	cmd.ExtraFiles = cfg.ExtraFiles
	cmd.Stdin = nil
	cmd.Stdout = cfg.Stdout
	// Not an *os.File: exec copies stderr from a pipe, and Wait returns only once the copy reached its end.
	var stderr io.Writer = p.stderr
	// Lines can arrive before cmd.Start returns; emit waits until p.log, which carries the pid, is set.
	started := make(chan struct{})
	if cfg.StderrLine != nil {
		p.lines = &lineWriter{emit: func(line string) {
			<-started
			cfg.StderrLine(p.log, line)
		}}
		stderr = io.MultiWriter(p.stderr, p.lines)
	}
	cmd.Stderr = stderr
	// Wait returns only once every copy of the stdout and stderr pipes is closed: one kept open elsewhere (a
	// descendant that left the group, a QEMU taken over that handed its own stderr to the shim as a vring
	// descriptor) would keep the program from ever counting as exited, and its VM from being cleaned up.
	cmd.WaitDelay = ioWaitDelay
	// A group of its own lets Stop reach what the program forks (virtiofsd's sandboxed child).
	// Go sets the parent-death signal after the credentials, so a change of user does not clear it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true, Credential: cfg.Credential}
	cfg.Log.WithField("args", cmd.Args).Debugf("starting %s", cfg.Name)
	if cfg.NoHugePages {
		if err := unix.Prctl(unix.PR_SET_THP_DISABLE, 1, 0, 0, 0); err != nil {
			cfg.Log.WithError(err).Warnf("%s may use transparent huge pages", cfg.Name)
		}
	}
	fork := cmd.Start
	// enter puts the confined thread into a v1 cgroup before its confinement, which forbids the writes.
	var enter func() (leave func(), err error)
	if cfg.Cgroup != nil {
		if cfg.Confine != nil && !cfg.Cgroup.v2 {
			enter = cfg.Cgroup.enterThread
		} else {
			fork = func() error { return cfg.Cgroup.start(cmd.SysProcAttr, cmd.Start) }
		}
	}
	start := fork
	if cfg.Batch {
		start = func() error {
			schedErr, err := startBatch(fork, threadSched{})
			if schedErr != nil {
				cfg.Log.WithError(schedErr).Warnf("%s runs with the normal scheduling policy", cfg.Name)
			}
			return err
		}
	}
	var err error
	if cfg.Confine != nil {
		var writes []string
		if cfg.Stdout == nil {
			writes = append(writes, os.DevNull)
		}
		err = startConfined(start, enter, func() error { return cfg.Confine(writes) }, p.exited)
	} else {
		err = start()
	}
	if err != nil {
		return nil, fmt.Errorf("run %s: %w", cfg.Path, err)
	}
	p.cmd = cmd
	p.log = cfg.Log.WithField("pid", cmd.Process.Pid)
	close(started)
	go p.reap()
	return p, nil
}

// startConfined runs start from a thread of its own, which enter (when set) puts into the program's cgroup and
// confine restricts first, and keeps that thread until done is closed (the program's parent-death signal is tied
// to it). The thread then ends with its goroutine, never unlocked, so that no other goroutine runs with its
// restrictions. It leaves the cgroup from here, unconfined: the confined thread may not write the cgroup's files.
func startConfined(start func() error, enter func() (func(), error), confine func() error, done <-chan struct{}) error {
	type result struct {
		leave func()
		err   error
	}
	started := make(chan result, 1)
	// The thread stays until the caller has put it back into its cgroup: a thread that ended could have its id
	// taken by another's meanwhile.
	left := make(chan struct{})
	go func() {
		runtime.LockOSThread()
		var r result
		r.err = func() (err error) {
			if enter != nil {
				if r.leave, err = enter(); err != nil {
					return err
				}
			}
			if err := confine(); err != nil {
				return fmt.Errorf("confine: %w", err)
			}
			return start()
		}()
		started <- r
		<-left
		if r.err == nil {
			<-done
		}
	}()
	r := <-started
	if r.leave != nil {
		r.leave()
	}
	close(left)
	return r.err
}

func (p *Process) reap() {
	err := p.cmd.Wait()
	if p.lines != nil {
		p.lines.flush()
	}
	p.exitErr = err
	close(p.exited)
}

// PID is the program's process id, also the id of its process group.
func (p *Process) PID() int { return p.cmd.Process.Pid }

// Exited is closed once the program has exited, been reaped, and its stderr has been read to the end.
func (p *Process) Exited() <-chan struct{} { return p.exited }

// ExitError says how the program ended ("QEMU exited: exit status 1"; it wraps the *exec.ExitError when
// there is one); nil while it runs.
func (p *Process) ExitError() error {
	select {
	case <-p.exited:
	default:
		return nil
	}
	if p.exitErr == nil {
		return fmt.Errorf("%s exited", p.cfg.Name)
	}
	return fmt.Errorf("%s exited: %w", p.cfg.Name, p.exitErr)
}

// Diagnostics is the tail of the program's stderr, formatted to be appended to an error
// ("\nQEMU stderr:\n..."); empty when it wrote nothing.
func (p *Process) Diagnostics() string {
	if s := bytes.TrimSpace(p.stderr.Bytes()); len(s) > 0 {
		return fmt.Sprintf("\n%s stderr:\n%s", p.cfg.Name, s)
	}
	return ""
}

// Stop ends the program: Config.Quit (or SIGTERM to its group), then SIGKILL to its group after StopTimeout or
// as soon as ctx ends; it returns once the program has been reaped. Safe to call more than once, concurrently,
// and after the program exited on its own.
func (p *Process) Stop(ctx context.Context) {
	p.stopOnce.Do(func() { p.stop(ctx) })
	<-p.exited
}

func (p *Process) stop(ctx context.Context) {
	select {
	case <-p.exited:
		return
	default:
	}
	// A held program (Hold) could answer no request to quit until the holder let it go on.
	p.signalGroup(unix.SIGCONT)
	// StopTimeout bounds the request to quit too: a program too stuck to answer it (QEMU stopped, or its
	// monitor wedged) is killed, not waited for.
	qctx, cancel := context.WithTimeout(ctx, p.cfg.StopTimeout)
	defer cancel()
	if p.cfg.Quit != nil {
		if err := p.cfg.Quit(qctx); err != nil {
			p.log.WithError(err).Debugf("asking %s to quit failed; it is killed after %s", p.cfg.Name, p.cfg.StopTimeout)
		}
	} else {
		p.signalGroup(unix.SIGTERM)
	}
	select {
	case <-p.exited:
		return
	case <-qctx.Done():
		if ctx.Err() == nil {
			p.log.Warnf("%s did not stop in time; killing it", p.cfg.Name)
		}
	}
	p.Kill()
}

// Hold stops the program and what it forked (on: SIGSTOP to its group), or lets them go on (SIGCONT), for an
// owner that keeps a program of a background VM from competing with the host's foreground work for a moment (a
// spare's VM, runtime/spare). Stop continues a held program before it asks it to quit.
func (p *Process) Hold(on bool) {
	sig := unix.SIGCONT
	if on {
		sig = unix.SIGSTOP
	}
	p.signalGroup(sig)
}

// Kill sends SIGKILL to the program's group and returns once the program has been reaped.
func (p *Process) Kill() {
	p.signalGroup(unix.SIGKILL)
	<-p.exited
}

// signalGroup signals the program's process group, until Exited is closed. The group id is the leader's pid,
// which the kernel does not reuse while the leader is unreaped or any member of its group lives. While Exited is
// open, either the leader is unreaped or something still holds its stderr: normally a member of its group
// (virtiofsd's sandboxed child), which the signal is then meant for.
func (p *Process) signalGroup(sig unix.Signal) {
	select {
	case <-p.exited:
		return
	default:
	}
	if err := unix.Kill(-p.cmd.Process.Pid, sig); err != nil && !errors.Is(err, unix.ESRCH) {
		p.log.WithError(err).Debugf("signal %s with %v", p.cfg.Name, sig)
	}
}
