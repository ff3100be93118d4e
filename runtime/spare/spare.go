// Package spare keeps, for each containerd, shim servers started ahead of demand (one by default, a pool of up to
// config.MaxSparePool): each holds a pod booted (from its template when there is one) and warmed by a throwaway
// container, and the next task's `start` hands one of them that task instead of starting a server
// (docs/fast-start-log.md, sessions 14 and 23). This package is the slots such spares wait in, the hand-over between
// `start` and a spare, and the holds a `start` that finds none ready puts on the spares still booting (hold.go,
// session 25); what a spare holds is runtime/task's and runtime/pod's.
package spare

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// ErrNone is returned by Adopt when no spare waits in the slot.
var ErrNone = errors.New("no spare shim is waiting")

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

// Build is version made specific to the shim binary this process runs, as a spare and a task's `start` compare it
// (Request.Version): the version is the same for every build of a tree with uncommitted changes ("…-dirty") or
// without git ("dev"), so the binary's own file is added (its device, inode, size and modification time, read through
// /proc/self/exe, which names the file the process runs even after another replaced it): the spares of a binary
// `make install` replaced are stale, whatever the version says.
func Build(version string) string {
	var st unix.Stat_t
	if err := unix.Stat("/proc/self/exe", &st); err != nil {
		return version
	}
	return fmt.Sprintf("%s+%x.%x.%x.%x", version, st.Dev, st.Ino, st.Size, st.Mtim.Nano())
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
	// The spare serves only once it reads this: a `start` that gave up as the pid came (its deadline) closes the
	// connection unconfirmed and serves the task itself, so that one server, never two, takes the socket.
	if _, err := uc.Write([]byte(handOverConfirm)); err != nil {
		return 0, fmt.Errorf("%w (confirm to pid %d: %v)", ErrNone, pid, err)
	}
	return pid, nil
}

// handOverConfirm is what `start` sends a spare once it has read the spare's pid: the task is the spare's.
const handOverConfirm = "ok"

// confirmTimeout bounds a spare's wait for handOverConfirm, which `start` sends as soon as it reads the pid.
const confirmTimeout = 5 * time.Second

// ownedPoll is how often a waiting spare checks that its slot's lock file is still the one it holds.
const ownedPoll = time.Second

// ErrSlotGone is returned by Wait when the slot's lock file is not the one the spare holds any more: removed
// (Purge, `make uninstall`) or claimed again since. A spare that waited on would hold a slot nobody lists (All)
// and nobody stops (Stop).
var ErrSlotGone = errors.New("the spare shim's slot was removed")

// owned says (nil) whether the slot's lock file is still the one this spare holds.
func (s *Slot) owned() error {
	if err := isFile(int(s.lock.Fd()), s.path+".lock"); err != nil {
		return fmt.Errorf("%w: %s: %v", ErrSlotGone, s.path+".lock", err)
	}
	return nil
}

// ErrLost is returned by Wait when what the spare holds ended while it waited (its VM).
var ErrLost = errors.New("what the spare shim held ended while it waited")

// errDeclined is a hand-over whose task the spare does not fit: `start` starts the server itself.
var errDeclined = errors.New("the spare does not fit the task")

// ErrRefused marks what Fits says of a task no shim would take (its spec or its configuration is refused): the
// spare declines it, and its shim refuses it, but it says nothing of the shapes tasks ask for, so the decline is
// not counted towards maxDeclines.
var ErrRefused = errors.New("the task is refused")

// ErrUnwanted is returned by Wait once maxDeclines tasks in a row were declined: the host's tasks are no longer
// of the spare's shape, and the spare leaves so that the next task's shim can start one of theirs.
var ErrUnwanted = errors.New("the spare fits none of the tasks that come")

// maxDeclines is how many tasks in a row a spare declines before it leaves its slot. One task of another shape
// now and then leaves the spare for the usual ones; a run of them means the usual ones have changed.
const maxDeclines = 3

// Wait listens in the slot until `start` hands over a task of the spare's version that fits (fits, when set),
// and returns it with the server's socket. A task that does not fit is declined: its `start` starts the server
// itself, and the spare waits on, up to maxDeclines in a row (ErrUnwanted). It gives up with ctx's error, after
// idle, with ErrStale, with ErrLost once lost is closed, or with ErrSlotGone when its lock file went (before it
// listens, or as a hand-over comes), leaving the slot empty. Either way the slot is
// released: another spare can claim it. A lost spare's log stays, as a failed one's does, until the next spare
// claims the slot.
func (s *Slot) Wait(ctx context.Context, idle time.Duration, pid int, version string, lost <-chan struct{}, fits Fits) (_ Request, _ *os.File, err error) {
	defer func() { s.release(errors.Is(err, ErrLost)) }()
	if err := s.owned(); err != nil {
		return Request{}, nil, err
	}
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: s.path, Net: "unix"})
	if err != nil {
		return Request{}, nil, fmt.Errorf("spare shim socket: %w", err)
	}
	l.SetUnlinkOnClose(true)
	s.l = l
	ctx, cancel := context.WithTimeout(ctx, idle)
	defer cancel()
	// One goroutine closes the listener, to end the wait: when ctx ends, when what the spare holds is lost, or
	// when the slot's lock file goes (Purge, `make uninstall`), which no connection may come to tell: the socket
	// may have gone with it. It is done before the slot is released. A slot that is not this spare's any more
	// keeps the socket path: it may name another spare's socket by now.
	var gone atomic.Bool
	var slotErr atomic.Pointer[error]
	watched := make(chan struct{})
	go func() {
		defer close(watched)
		defer func() {
			if s.owned() != nil {
				l.SetUnlinkOnClose(false)
			}
			_ = l.Close()
		}()
		tick := time.NewTicker(ownedPoll)
		defer tick.Stop()
		for {
			select {
			case <-lost:
				gone.Store(true)
				return
			case <-ctx.Done():
				return
			case <-tick.C:
				if err := s.owned(); err != nil {
					slotErr.Store(&err)
					return
				}
			}
		}
	}()
	defer func() { cancel(); <-watched }()
	declined := 0
	for {
		c, err := l.AcceptUnix()
		if err != nil {
			if gone.Load() {
				return Request{}, nil, ErrLost
			}
			if err := slotErr.Load(); err != nil {
				return Request{}, nil, *err
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
		if err := s.owned(); err != nil {
			_ = c.Close()
			return Request{}, nil, err
		}
		req, socket, err := receive(c, pid, version, fits)
		_ = c.Close()
		if err == nil || errors.Is(err, ErrStale) {
			return req, socket, err
		}
		if errors.Is(err, errDeclined) && !errors.Is(err, ErrRefused) {
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
			return Request{}, nil, fmt.Errorf("%w: %w", errDeclined, err)
		}
	}
	unix.CloseOnExec(fds[0])
	socket := os.NewFile(uintptr(fds[0]), "shim socket")
	if _, err := c.Write([]byte(strconv.Itoa(pid))); err != nil {
		_ = socket.Close()
		return Request{}, nil, err
	}
	_ = c.SetDeadline(time.Now().Add(confirmTimeout))
	confirm := make([]byte, len(handOverConfirm))
	if _, err := io.ReadFull(c, confirm); err != nil || string(confirm) != handOverConfirm {
		_ = socket.Close()
		return Request{}, nil, fmt.Errorf("hand-over not confirmed (its start gave up): %q, %v", confirm, err)
	}
	return req, socket, nil
}
