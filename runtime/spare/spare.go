// Package spare keeps, for each containerd, shim servers started ahead of demand (one by default, a pool of up to
// config.MaxSparePool): each holds a pod booted (from its template when there is one) and warmed by a throwaway
// container, and the next task's `start` hands one of them that task instead of starting a server
// (docs/fast-start.md, sessions 14 and 23). This package is the slots such spares wait in and the hand-over
// between `start` and a spare; what a spare holds is runtime/task's and runtime/pod's.
package spare

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Dir holds the slots: a socket, its lock and a log per spare, up to a pool's size per containerd. Not under Kiln's state directory, because `start`
// does not know Kiln's configuration (containerd passes its runtime options with Create only).
const Dir = "/run/kiln/spare"

// ErrNone is returned by Adopt when no spare waits in the slot.
var ErrNone = errors.New("no spare shim is waiting")

// ErrTaken is returned by Claim when another spare holds the slot.
var ErrTaken = errors.New("another spare shim holds the slot")

// maxRequest bounds a hand-over's size; a request carries a command line and an environment.
const maxRequest = 1 << 20

// Request is what `start` hands a spare: the command line, environment and directory it would have started the
// shim server with. The server's listening socket goes with it, as a descriptor.
type Request struct {
	// Version is the shim binary's build version at `start`: a spare of another (an upgrade came since it
	// started) refuses the task and leaves.
	Version string   `json:"version"`
	Args    []string `json:"args"`
	Env     []string `json:"env"`
	Dir     string   `json:"dir"`
	// Task, when `start` knows it, is the task the server is started for, so that a spare whose VM does not fit
	// it declines before it takes anything: the task's shim then boots its own VM, and the spare waits for the
	// next. Nil leaves the decision to the task's Create.
	Task *Task `json:"task,omitempty"`
}

// Task is the task a server is started for: its id (its bundle is the request's Dir) and the Kiln configuration
// its runtime options name ("" for the default).
type Task struct {
	ID         string `json:"id"`
	ConfigPath string `json:"config_path"`
}

// Fits decides whether a spare can serve a hand-over's task: an error declines it.
type Fits func(Request) error

// ErrStale is returned by Wait when a task came from a shim binary of another version than the spare's.
var ErrStale = errors.New("a task came from another version of the shim; the spare is stale")

// slotPrefix names the slots of the containerd whose address is address.
func slotPrefix(dir, address string) string {
	sum := sha256.Sum256([]byte(address))
	return filepath.Join(dir, hex.EncodeToString(sum[:8]))
}

// socketPath is slot i of the containerd whose address is address. Slot 0 has the name a pool of one has always
// had.
func socketPath(dir, address string, i int) string {
	if i == 0 {
		return slotPrefix(dir, address) + ".sock"
	}
	return slotPrefix(dir, address) + "-" + strconv.Itoa(i) + ".sock"
}

// listening lists the sockets of the containerd's slots whose spares wait for a task.
func listening(dir, address string) []string {
	prefix := slotPrefix(dir, address)
	first, _ := filepath.Glob(prefix + ".sock")
	rest, _ := filepath.Glob(prefix + "-*.sock")
	return append(first, rest...)
}

// Adopt hands the server start req, with its listening socket, to a spare waiting for the containerd at address,
// and returns the spare's pid. ErrNone means none took it; the caller then starts the server itself.
func Adopt(ctx context.Context, address string, req Request, socket *os.File) (int, error) {
	return adopt(ctx, Dir, address, req, socket)
}

// adopt offers the task to each waiting spare in turn until one takes it. Tasks started together (a burst the
// pool is for) begin at different spares, by pid, so that they do not queue at the first one's socket.
func adopt(ctx context.Context, dir, address string, req Request, socket *os.File) (int, error) {
	paths := listening(dir, address)
	if len(paths) == 0 {
		return 0, fmt.Errorf("%w (no slot of %s listens: %w)", ErrNone, address, os.ErrNotExist)
	}
	from := os.Getpid() % len(paths)
	var errs []error
	for k := range paths {
		pid, err := handOver(ctx, paths[(from+k)%len(paths)], req, socket)
		if err == nil || !errors.Is(err, ErrNone) {
			return pid, err
		}
		errs = append(errs, err)
		if ctx.Err() != nil {
			break
		}
	}
	return 0, errors.Join(errs...)
}

// handOver offers the task to the spare listening at path.
func handOver(ctx context.Context, path string, req Request, socket *os.File) (int, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return 0, fmt.Errorf("%w (%w)", ErrNone, err)
	}
	defer c.Close()
	uc := c.(*net.UnixConn)
	if deadline, ok := ctx.Deadline(); ok {
		_ = uc.SetDeadline(deadline)
	}
	b, err := json.Marshal(req)
	if err != nil {
		return 0, fmt.Errorf("hand over to spare shim: %w", err)
	}
	if _, _, err := uc.WriteMsgUnix(b, unix.UnixRights(int(socket.Fd())), nil); err != nil {
		return 0, fmt.Errorf("%w (hand-over: %v)", ErrNone, err)
	}
	_ = uc.CloseWrite()
	reply := make([]byte, 32)
	n, err := uc.Read(reply)
	if err != nil {
		// The spare took nothing: it answers only once it has the task.
		return 0, fmt.Errorf("%w (no answer: %v)", ErrNone, err)
	}
	pid, err := strconv.Atoi(string(reply[:n]))
	if err != nil || pid <= 0 {
		return 0, fmt.Errorf("spare shim answered %q, not a pid", reply[:n])
	}
	return pid, nil
}

// Slot is the place a spare waits in: the lock that keeps it the only spare in it, and the socket `start` finds it
// by.
type Slot struct {
	path string
	lock *os.File
	l    *net.UnixListener
}

// LockFD is the descriptor a spare finds its slot's lock on: Spawn takes the slot for the spare it starts, so that
// spawners that find the same slots free (tasks started together) start one spare per slot, not one each.
const LockFD = GateFD + 1

// SlotFlag is the spare's command-line flag that names its slot (Spawn's).
const SlotFlag = "slot"

// Claimed is slot i of the containerd at address, whose lock this process's spawner took for it (Spawn) and left at
// LockFD. It listens only once Wait is called: until then `start` finds no spare.
func Claimed(address string, i int) (*Slot, error) {
	path := socketPath(Dir, address, i)
	var held, named unix.Stat_t
	if err := unix.Fstat(LockFD, &held); err != nil {
		return nil, fmt.Errorf("spare shim: no lock of slot %s at descriptor %d (spares are started by spare.Spawn): %w", path, LockFD, err)
	}
	if err := unix.Stat(path+".lock", &named); err != nil || held.Dev != named.Dev || held.Ino != named.Ino {
		return nil, fmt.Errorf("spare shim: descriptor %d is not the lock of slot %s (spares are started by spare.Spawn)", LockFD, path)
	}
	// Nothing the spare starts (QEMU, virtiofsd) may hold the slot after it.
	unix.CloseOnExec(LockFD)
	return &Slot{path: path, lock: os.NewFile(LockFD, path+".lock")}, nil
}

// claim takes slot i of the containerd at address, or returns ErrTaken, naming holder in its lock (0: none yet,
// for a spawner that names the spare once it has started it).
func claim(dir, address string, i, holder int) (*Slot, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("spare shim directory: %w", err)
	}
	path := socketPath(dir, address, i)
	lock, err := os.OpenFile(path+".lock", os.O_CREATE|os.O_RDWR|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("spare shim lock: %w", err)
	}
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		_ = lock.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, ErrTaken
		}
		return nil, fmt.Errorf("spare shim lock %s: %w", path+".lock", err)
	}
	slot := &Slot{path: path, lock: lock}
	if err := lock.Truncate(0); err == nil && holder > 0 {
		slot.name(holder, address)
	}
	// A socket here is a killed spare's (the lock says no live spare owns it): gone now, whether or not this
	// spare lives to listen, so that `start` does not dial it and nothing of the dead spare stays.
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		_ = lock.Close()
		return nil, fmt.Errorf("spare shim socket: %w", err)
	}
	// The log is the holder's from here on: what a spare that failed before left in it goes.
	if err := os.Truncate(path+".log", 0); err != nil && !errors.Is(err, os.ErrNotExist) {
		_ = lock.Close()
		return nil, fmt.Errorf("spare shim log: %w", err)
	}
	return slot, nil
}

// name writes the slot's holder into its lock, for whoever must stop it (`make uninstall`, tests, `kiln check`).
func (s *Slot) name(holder int, address string) {
	_, _ = s.lock.WriteAt([]byte(fmt.Sprintf("%d %s\n", holder, address)), 0)
}

// Info describes a spare shim that holds a slot, or that left one without giving it up (Failed).
type Info struct {
	// Pid is the spare's process id, Address its containerd's.
	Pid     int
	Address string
	// Ready says it waits for a task; otherwise it is still booting or warming its VM.
	Ready bool
	// Slot is the slot's socket path; Slot+".log" is the spare's log until it takes a task, and Slot+".lock" its
	// lock.
	Slot string
}

// All lists the spare shims that hold a slot (`kiln check`, `make uninstall`'s tests).
func All() []Info {
	held, _ := scan(Dir)
	return held
}

// Failed lists the slots whose last spare left without giving them up: it failed (its VM did not boot, say) or
// was killed. Its lock still names it, and its log stays there until the slot's next spare (`kiln check`).
func Failed() []Info {
	_, failed := scan(Dir)
	return failed
}

// scan reads the slots in dir: those a live spare holds, and those a spare left without giving them up.
func scan(dir string) (held, failed []Info) {
	locks, _ := filepath.Glob(filepath.Join(dir, "*.sock.lock"))
	for _, path := range locks {
		f, err := os.Open(path)
		if err != nil {
			continue
		}
		// A lock that can be taken has no holder: the file outlives its last spare.
		free := unix.Flock(int(f.Fd()), unix.LOCK_SH|unix.LOCK_NB) == nil
		_ = f.Close()
		b, err := os.ReadFile(path)
		if err != nil {
			continue
		}
		pidText, address, _ := strings.Cut(strings.TrimSpace(string(b)), " ")
		pid, err := strconv.Atoi(pidText)
		if err != nil || pid <= 0 {
			continue
		}
		slot := strings.TrimSuffix(path, ".lock")
		if free {
			failed = append(failed, Info{Pid: pid, Address: address, Slot: slot})
			continue
		}
		_, err = os.Stat(slot)
		held = append(held, Info{Pid: pid, Address: address, Ready: err == nil, Slot: slot})
	}
	return held, failed
}

// ErrLost is returned by Wait when what the spare holds ended while it waited (its VM).
var ErrLost = errors.New("what the spare shim held ended while it waited")

// errDeclined is a hand-over whose task the spare does not fit: `start` starts the server itself.
var errDeclined = errors.New("the spare does not fit the task")

// ErrUnwanted is returned by Wait once maxDeclines tasks in a row were declined: the host's tasks are no longer
// of the spare's shape, and the spare leaves so that the next task's shim can start one of theirs.
var ErrUnwanted = errors.New("the spare fits none of the tasks that come")

// maxDeclines is how many tasks in a row a spare declines before it leaves its slot. One task of another shape
// now and then leaves the spare for the usual ones; a run of them means the usual ones have changed.
const maxDeclines = 3

// Wait listens in the slot until `start` hands over a task of the spare's version that fits (fits, when set),
// and returns it with the server's socket. A task that does not fit is declined: its `start` starts the server
// itself, and the spare waits on, up to maxDeclines in a row (ErrUnwanted). It gives up with ctx's error, after
// idle, with ErrStale, or with ErrLost once lost is closed, leaving the slot empty. Either way the slot is
// released: another spare can claim it. A lost spare's log stays, as a failed one's does, until the next spare
// claims the slot.
func (s *Slot) Wait(ctx context.Context, idle time.Duration, pid int, version string, lost <-chan struct{}, fits Fits) (_ Request, _ *os.File, err error) {
	defer func() { s.release(errors.Is(err, ErrLost)) }()
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: s.path, Net: "unix"})
	if err != nil {
		return Request{}, nil, fmt.Errorf("spare shim socket: %w", err)
	}
	l.SetUnlinkOnClose(true)
	s.l = l
	ctx, cancel := context.WithTimeout(ctx, idle)
	defer cancel()
	stop := context.AfterFunc(ctx, func() { _ = l.Close() })
	defer stop()
	var gone atomic.Bool
	go func() {
		select {
		case <-lost:
			gone.Store(true)
			_ = l.Close()
		case <-ctx.Done():
		}
	}()
	declined := 0
	for {
		c, err := l.AcceptUnix()
		if err != nil {
			if gone.Load() {
				return Request{}, nil, ErrLost
			}
			if ctx.Err() != nil {
				return Request{}, nil, fmt.Errorf("spare shim: no task came: %w", ctx.Err())
			}
			return Request{}, nil, fmt.Errorf("spare shim: accept: %w", err)
		}
		if gone.Load() {
			// Lost while this hand-over came in: its `start` starts the server itself.
			_ = c.Close()
			return Request{}, nil, ErrLost
		}
		req, socket, err := receive(c, pid, version, fits)
		_ = c.Close()
		if err == nil || errors.Is(err, ErrStale) {
			return req, socket, err
		}
		if errors.Is(err, errDeclined) {
			if declined++; declined == maxDeclines {
				return Request{}, nil, fmt.Errorf("%w (the last: %v)", ErrUnwanted, err)
			}
		}
		// A declined or malformed hand-over: its sender starts the server itself. Wait for the next.
	}
}

// receive reads one hand-over and answers it with pid when it is of version and fits.
func receive(c *net.UnixConn, pid int, version string, fits Fits) (Request, *os.File, error) {
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, maxRequest)
	oob := make([]byte, unix.CmsgSpace(4))
	n, oobn, _, _, err := c.ReadMsgUnix(buf, oob)
	if err != nil {
		return Request{}, nil, err
	}
	var fds []int
	if msgs, err := unix.ParseSocketControlMessage(oob[:oobn]); err == nil {
		for i := range msgs {
			if got, err := unix.ParseUnixRights(&msgs[i]); err == nil {
				fds = append(fds, got...)
			}
		}
	}
	closeAll := func() {
		for _, fd := range fds {
			_ = unix.Close(fd)
		}
	}
	if len(fds) != 1 {
		closeAll()
		return Request{}, nil, fmt.Errorf("hand-over with %d descriptors, want the server socket", len(fds))
	}
	var req Request
	if err := json.Unmarshal(buf[:n], &req); err != nil || len(req.Args) == 0 || req.Dir == "" {
		closeAll()
		return Request{}, nil, fmt.Errorf("malformed hand-over: %v", err)
	}
	if req.Version != version {
		closeAll()
		return Request{}, nil, fmt.Errorf("%w (spare %q, task %q)", ErrStale, version, req.Version)
	}
	if fits != nil {
		if err := fits(req); err != nil {
			closeAll()
			return Request{}, nil, fmt.Errorf("%w: %v", errDeclined, err)
		}
	}
	unix.CloseOnExec(fds[0])
	socket := os.NewFile(uintptr(fds[0]), "shim socket")
	if _, err := c.Write([]byte(strconv.Itoa(pid))); err != nil {
		_ = socket.Close()
		return Request{}, nil, err
	}
	return req, socket, nil
}

// Close gives the slot up, as Wait does when it returns, for a spare that leaves before it waits (told to stop
// while it booted).
func (s *Slot) Close() { s.release(false) }

// release gives the slot up, removing its files (the socket, the log unless keepLog, and the lock) while it still
// holds the lock, so that a containerd that is gone leaves nothing in Dir. The log of a spare that failed, which
// exits without release, stays. A lock file that is not the held one any more (a claimer recreated it) is left to
// its holder.
func (s *Slot) release(keepLog bool) {
	if s.l != nil {
		_ = s.l.Close()
	}
	var held, named unix.Stat_t
	if unix.Fstat(int(s.lock.Fd()), &held) == nil && unix.Stat(s.path+".lock", &named) == nil &&
		held.Dev == named.Dev && held.Ino == named.Ino {
		if !keepLog {
			_ = os.Remove(s.path + ".log")
		}
		_ = os.Remove(s.path + ".lock")
	}
	_ = s.lock.Close()
}

// SpareArg is the first argument of the shim binary run as a spare: `containerd-shim-kiln-v2 spare -address A
// -slot I -config C` and Spawn's further arguments.
const SpareArg = "spare"

// Spawn fills the free slots among the first pool of the containerd at address: for each, it starts the shim
// binary self as a spare, with the Kiln configuration at configPath and the further arguments args, in a session of
// its own so that it outlives the caller, having taken the slot for it (LockFD). The spares boot nothing until the
// returned gate is closed: the caller closes it once its own start is over, so that they do not compete with it
// for CPU, or exits, which closes it too. A nil gate means every slot was taken. A slot whose spare could not
// start is given up again, and the error says why.
func Spawn(self, address string, pool int, configPath string, args ...string) (gate *os.File, err error) {
	return spawn(Dir, self, address, pool, configPath, args...)
}

func spawn(dir, self, address string, pool int, configPath string, args ...string) (gate *os.File, err error) {
	r, w, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("start spare shim: %w", err)
	}
	defer r.Close()
	var errs []error
	started := 0
	for i := 0; i < pool; i++ {
		slot, err := claim(dir, address, i, 0)
		if errors.Is(err, ErrTaken) {
			continue
		}
		if err == nil {
			err = slot.start(self, address, r, append([]string{SpareArg, "-address", address, "-" + SlotFlag, strconv.Itoa(i),
				"-config", configPath}, args...))
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("start spare shim in slot %d: %w", i, err))
			continue
		}
		started++
	}
	if started == 0 {
		_ = w.Close()
		w = nil
	}
	return w, errors.Join(errs...)
}

// start runs self with args as the spare of the slot (of the containerd at address), which it hands the slot's
// lock and the gate r, and names it in the lock; the slot is given up when it cannot.
func (s *Slot) start(self, address string, r *os.File, args []string) error {
	logf, err := os.OpenFile(s.path+".log", os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		s.release(false)
		return fmt.Errorf("spare shim log: %w", err)
	}
	defer logf.Close()
	cmd := exec.Command(self, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.ExtraFiles = []*os.File{r, s.lock}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		s.release(false)
		return err
	}
	go func() { _ = cmd.Wait() }()
	s.name(cmd.Process.Pid, address)
	// The spare holds the lock now (the same open file); the spawner's descriptor goes, not the slot's files.
	return s.lock.Close()
}

// GateFD is the descriptor a spare finds its gate on (Spawn's ExtraFiles). It is also where the shim socket of
// the task handed over goes (pkg/shim serves on descriptor 3): WaitGate leaves /dev/null there meanwhile, so that
// nothing else the spare opens takes it.
const GateFD = 3

// WaitGate waits until the spare's spawner closes the gate (or ctx ends), then puts /dev/null at GateFD.
func WaitGate(ctx context.Context) error {
	done := make(chan struct{})
	go func() {
		var b [1]byte
		_, _ = unix.Read(GateFD, b[:])
		close(done)
	}()
	select {
	case <-done:
	case <-ctx.Done():
		return ctx.Err()
	}
	null, err := unix.Open("/dev/null", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("spare shim: %w", err)
	}
	defer unix.Close(null)
	if err := unix.Dup3(null, GateFD, unix.O_CLOEXEC); err != nil {
		return fmt.Errorf("spare shim: keep descriptor %d: %w", GateFD, err)
	}
	return nil
}

// Take puts the handed-over shim socket at GateFD, where pkg/shim's server takes its listener from, and closes
// socket.
func Take(socket *os.File) error {
	defer socket.Close()
	if err := unix.Dup3(int(socket.Fd()), GateFD, 0); err != nil {
		return fmt.Errorf("spare shim: take the shim socket: %w", err)
	}
	return nil
}
