package agent

import (
	"context"
	"errors"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"
)

// Reaper reaps every child of the agent that exits and that nobody else
// waits for. As PID 1 the agent inherits all orphans of the guest; without
// reaping they stay zombies.
//
// A blind Wait4(-1) would also steal the exit status of children whose
// owner waits for them itself (libcontainer's setup processes, container
// processes): their owner's wait would then fail with ECHILD. So the reaper
// only reaps zombies that are not claimed, found by pid in /proc, and stops
// altogether while an owner holds it around a call that starts and waits
// for children it cannot claim in advance.
type Reaper struct {
	log     *logrus.Entry
	self    int
	kick    chan struct{}
	stopped chan struct{} // closed when the loop Start began has ended

	mu      sync.Mutex
	holds   int
	claimed map[int]int
}

// NewReaper returns a reaper that does nothing until Start.
func NewReaper(log *logrus.Entry) *Reaper {
	return &Reaper{log: log, self: os.Getpid(), kick: make(chan struct{}, 1), stopped: make(chan struct{}), claimed: map[int]int{}}
}

// StartReaper starts a new reaper until ctx is done and returns it.
func StartReaper(ctx context.Context, log *logrus.Entry) *Reaper {
	r := NewReaper(log)
	r.Start(ctx)
	return r
}

// Start reaps on every SIGCHLD (and whenever a hold or claim ends) until
// ctx is done.
func (r *Reaper) Start(ctx context.Context) {
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, unix.SIGCHLD)
	go func() {
		defer close(r.stopped)
		defer signal.Stop(sigs)
		// Children may have exited before Notify was in place.
		r.reapAll()
		for {
			select {
			case <-ctx.Done():
				return
			case <-sigs:
			case <-r.kick:
			}
			if ctx.Err() != nil {
				return
			}
			r.reapAll()
		}
	}()
}

// Hold stops reaping until release is called. Holds nest.
func (r *Reaper) Hold() (release func()) {
	r.mu.Lock()
	r.holds++
	r.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			r.mu.Lock()
			r.holds--
			r.mu.Unlock()
			r.wake()
		})
	}
}

// Claim leaves pid to its owner, who waits for it, until release is called
// (after the owner's wait returned).
func (r *Reaper) Claim(pid int) (release func()) {
	r.mu.Lock()
	r.claimed[pid]++
	r.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			r.mu.Lock()
			if r.claimed[pid]--; r.claimed[pid] <= 0 {
				delete(r.claimed, pid)
			}
			r.mu.Unlock()
			r.wake()
		})
	}
}

func (r *Reaper) wake() {
	select {
	case r.kick <- struct{}{}:
	default:
	}
}

// reapAll runs with the lock held, so that a Hold taken meanwhile waits
// for the pass to end: a pass that started before the hold could otherwise
// reap a child created under it.
func (r *Reaper) reapAll() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.holds > 0 {
		return
	}
	for _, pid := range zombieChildren(r.log, "/proc", r.self) {
		if r.claimed[pid] > 0 {
			continue
		}
		var status unix.WaitStatus
		for {
			got, err := unix.Wait4(pid, &status, unix.WNOHANG, nil)
			if errors.Is(err, unix.EINTR) {
				continue
			}
			if err == nil && got == pid {
				r.log.WithFields(logrus.Fields{"pid": pid, "status": describeWait(status)}).Debug("reaped orphan")
			}
			break
		}
	}
}

// zombieChildren lists the zombies whose parent is ppid. SIGCHLDs
// coalesce, so each pass looks at every process.
func zombieChildren(log *logrus.Entry, procDir string, ppid int) []int {
	entries, err := os.ReadDir(procDir)
	if err != nil {
		log.WithError(err).Warn("list processes to reap")
		return nil
	}
	var out []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join(procDir, e.Name(), "stat"))
		if err != nil {
			continue // gone meanwhile
		}
		state, parent, ok := parseStat(string(b))
		if ok && state == 'Z' && parent == ppid {
			out = append(out, pid)
		}
	}
	return out
}

// parseStat reads the state and parent pid from /proc/PID/stat (proc(5)).
// The command name is in parentheses and may itself hold spaces and
// parentheses, so the fields are counted from the last ')'.
func parseStat(stat string) (state byte, ppid int, ok bool) {
	i := strings.LastIndexByte(stat, ')')
	if i < 0 {
		return 0, 0, false
	}
	fields := strings.Fields(stat[i+1:])
	if len(fields) < 2 || len(fields[0]) != 1 {
		return 0, 0, false
	}
	ppid, err := strconv.Atoi(fields[1])
	if err != nil {
		return 0, 0, false
	}
	return fields[0][0], ppid, true
}

func describeWait(ws unix.WaitStatus) string {
	switch {
	case ws.Exited():
		return "exited " + strconv.Itoa(ws.ExitStatus())
	case ws.Signaled():
		return "killed by " + ws.Signal().String()
	default:
		return "status " + strconv.Itoa(int(ws))
	}
}
