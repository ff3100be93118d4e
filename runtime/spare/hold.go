package spare

import (
	"context"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"
)

// A task's `start` that finds no spare ready starts the task's shim server itself, whose VM then boots beside the
// spares still booting. Under TCG a booting spare delays that start even at the lowest CPU weight, because it
// takes every moment the start leaves a core idle (docs/fast-start-log.md, session 24). So `start` holds the booting
// spares (Hold): each stops its VM's programs until the task's start is over (the server lets go, Held.Release),
// the server is gone (the kernel closes its end), or the spare has stood still for MaxHold in all.

// MaxHold bounds how long in all a spare stands still for the starts that hold it: its boot's own time limits
// (the restore's 30 s, a device unplug's 10 s) stay out of reach, and a host that never stops starting tasks
// still gets its spare.
const MaxHold = 5 * time.Second

// maxHolds bounds the holds a spare keeps at once; each task starting beside it takes one.
const maxHolds = 64

// HoldsEnv names, in the environment of a shim server `start` started, the descriptors of the holds it passed
// on (PassHolds): "4,5".
const HoldsEnv = "KILN_SPARE_HOLDS"

// holdSuffix names a slot's hold socket: its socket's path with it.
const holdSuffix = ".hold"

// Holder is a booting spare's end of the holds: it listens on its slot's hold socket and, while any start holds
// it, keeps the programs it is given stopped.
type Holder struct {
	l   *net.UnixListener
	log *logrus.Entry
	max time.Duration

	mu       sync.Mutex
	programs []interface{ Hold(on bool) }
	holds    map[*net.UnixConn]struct{}
	closed   bool
	// since is when the programs were stopped; zero while they run. used is how long they stood still before.
	since time.Time
	used  time.Duration
	// round counts the times the programs were stopped, so that the time limit of an earlier one passes over
	// the next.
	round int
	timer *time.Timer

	wg sync.WaitGroup
}

// Holder listens for holds on the slot's hold socket, for a spare that boots; Close stops that once it is ready.
func (s *Slot) Holder(log *logrus.Entry) (*Holder, error) {
	return listenHolds(s.path+holdSuffix, MaxHold, log)
}

func listenHolds(path string, max time.Duration, log *logrus.Entry) (*Holder, error) {
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, err
	}
	l.SetUnlinkOnClose(true)
	h := &Holder{l: l, log: log, max: max, holds: map[*net.UnixConn]struct{}{}}
	h.wg.Add(1)
	go h.accept()
	return h, nil
}

// Add is handed each program of the spare's VM as it starts (qemu.Config.Hold): a program started while the
// spare is held stops at once.
func (h *Holder) Add(p interface{ Hold(on bool) }) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.programs = append(h.programs, p)
	switch {
	case !h.since.IsZero():
		p.Hold(true)
	case len(h.holds) > 0:
		// Held before its VM had a program: the spare stands still from now on.
		h.stop()
	}
}

func (h *Holder) accept() {
	defer h.wg.Done()
	for {
		c, err := h.l.AcceptUnix()
		if err != nil {
			return // closed
		}
		if !h.begin(c) {
			_ = c.Close()
			continue
		}
		h.wg.Add(1)
		go func() {
			defer h.wg.Done()
			// A hold carries nothing: it ends when its holder closes its end, or sends anything.
			var b [1]byte
			_, _ = c.Read(b[:])
			h.end(c)
			_ = c.Close()
		}()
	}
}

// begin takes hold c, stopping the programs if it is the first and time is left.
func (h *Holder) begin(c *net.UnixConn) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closed || len(h.holds) >= maxHolds {
		return false
	}
	h.holds[c] = struct{}{}
	if len(h.holds) == 1 {
		h.stop()
	}
	return true
}

// stop stops the programs while time is left, and counts the time from now; h.mu is held. Until the VM has a
// program nothing stands still, so nothing is counted: the limit is on how long the VM stands still.
func (h *Holder) stop() {
	if h.used >= h.max || len(h.programs) == 0 {
		return
	}
	h.since = time.Now()
	h.round++
	round := h.round
	h.timer = time.AfterFunc(h.max-h.used, func() { h.runOut(round) })
	for _, p := range h.programs {
		p.Hold(true)
	}
	h.log.WithField("stood_still", h.used.Round(time.Millisecond)).Info("a task's start holds the booting spare")
}

// end lets hold c go, and the programs with it when it was the last.
func (h *Holder) end(c *net.UnixConn) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if _, ok := h.holds[c]; !ok {
		return
	}
	delete(h.holds, c)
	if len(h.holds) == 0 {
		h.letGo("the tasks' starts let the spare go on")
	}
}

// runOut lets the programs go on once the spare has stood still for max, whoever still holds it.
func (h *Holder) runOut(round int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if round == h.round && !h.since.IsZero() {
		h.letGo("the spare stood still as long as it may; it goes on")
		h.used = h.max
	}
}

// letGo continues the programs if they are stopped; h.mu is held.
func (h *Holder) letGo(why string) {
	if h.since.IsZero() {
		return
	}
	h.used += time.Since(h.since)
	h.since = time.Time{}
	h.timer.Stop()
	for _, p := range h.programs {
		p.Hold(false)
	}
	h.log.WithFields(logrus.Fields{"stood_still": h.used.Round(time.Millisecond), "holds": len(h.holds)}).Info(why)
}

// Close stops listening, lets the programs go on and drops every hold, and removes the hold socket.
func (h *Holder) Close() {
	h.mu.Lock()
	h.closed = true
	h.letGo("the spare's boot is over; it takes no more holds")
	conns := make([]*net.UnixConn, 0, len(h.holds))
	for c := range h.holds {
		conns = append(conns, c)
	}
	h.holds = map[*net.UnixConn]struct{}{}
	h.mu.Unlock()
	_ = h.l.Close()
	for _, c := range conns {
		_ = c.Close()
	}
	h.wg.Wait()
}

// StoodStill is how long in all the spare's programs were stopped.
func (h *Holder) StoodStill() time.Duration {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.since.IsZero() {
		return h.used
	}
	return h.used + time.Since(h.since)
}

// Hold holds each spare of the containerd at address that is still booting, and returns the holds: each lasts
// until the file is closed (by whoever it is passed to, or by the kernel once the last process holding it exits),
// or until its spare has stood still for MaxHold. A spare that is ready, gone or failed is not held.
func Hold(ctx context.Context, address string) []*os.File { return hold(ctx, Dir, address) }

func hold(ctx context.Context, dir, address string) []*os.File {
	var holds []*os.File
	var d net.Dialer
	for _, path := range slotPaths(dir, address, holdSuffix) {
		c, err := d.DialContext(ctx, "unix", path)
		if err != nil {
			continue
		}
		f, err := c.(*net.UnixConn).File()
		_ = c.Close()
		if err == nil {
			holds = append(holds, f)
		}
	}
	return holds
}

// PassHolds passes holds on to the program cmd starts, after its other ExtraFiles, and names their descriptors
// in its environment (HoldsEnv), where Inherited finds them.
func PassHolds(cmd *exec.Cmd, holds []*os.File) {
	if len(holds) == 0 {
		return
	}
	fds := make([]string, len(holds))
	for i := range holds {
		fds[i] = strconv.Itoa(3 + len(cmd.ExtraFiles) + i)
	}
	cmd.ExtraFiles = append(cmd.ExtraFiles, holds...)
	cmd.Env = append(cmd.Env, HoldsEnv+"="+strings.Join(fds, ","))
}

// Held is holds kept until a start is over: those a shim server was started with (Inherited), or those it took
// itself (NewHeld).
type Held struct {
	mu    sync.Mutex
	files []*os.File
}

// NewHeld keeps holds (Hold) until Release.
func NewHeld(holds []*os.File) *Held { return &Held{files: holds} }

// Inherited takes the holds this process was started with (PassHolds), before it starts anything: they are made
// close-on-exec, so that none of its programs keeps a spare stopped, and HoldsEnv leaves its environment. A
// descriptor that is not a socket above the shim's own (GateFD) is left alone. Nil without holds.
func Inherited() *Held {
	list, ok := os.LookupEnv(HoldsEnv)
	if !ok {
		return nil
	}
	_ = os.Unsetenv(HoldsEnv)
	h := &Held{}
	for _, s := range strings.Split(list, ",") {
		fd, err := strconv.Atoi(s)
		if err != nil || fd <= GateFD {
			continue
		}
		var st unix.Stat_t
		if unix.Fstat(fd, &st) != nil || st.Mode&unix.S_IFMT != unix.S_IFSOCK {
			continue
		}
		unix.CloseOnExec(fd)
		h.files = append(h.files, os.NewFile(uintptr(fd), "spare hold"))
	}
	return h
}

// Release lets the held spares go on, and returns how many there were. Safe on nil and more than once.
func (h *Held) Release() int {
	if h == nil {
		return 0
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	n := len(h.files)
	for _, f := range h.files {
		_ = f.Close()
	}
	h.files = nil
	return n
}
