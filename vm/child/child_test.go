package child

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/kiln-runtime/kiln/vm/confine"
)

func quietLog() *logrus.Entry {
	l := logrus.New()
	l.SetOutput(io.Discard)
	return logrus.NewEntry(l)
}

// shell is a Config running script with sh.
func shell(script string) Config {
	return Config{Name: "prog", Path: "/bin/sh", Args: []string{"-c", script}, Log: quietLog()}
}

func start(t *testing.T, cfg Config) *Process {
	t.Helper()
	p, err := Start(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Kill)
	return p
}

func waitExited(t *testing.T, p *Process) {
	t.Helper()
	select {
	case <-p.Exited():
	case <-time.After(10 * time.Second):
		t.Fatal("program still runs after 10 s")
	}
}

// startReady starts script, which must print "ready" on a line of its own to stderr once it is set up.
func startReady(t *testing.T, cfg Config) *Process {
	t.Helper()
	ready := make(chan struct{})
	var once sync.Once
	cfg.StderrLine = func(_ *logrus.Entry, l string) {
		if l == "ready" {
			once.Do(func() { close(ready) })
		}
	}
	p := start(t, cfg)
	select {
	case <-ready:
	case <-p.Exited():
		t.Fatalf("exited before it was ready: %v", p.ExitError())
	case <-time.After(10 * time.Second):
		t.Fatal("not ready after 10 s")
	}
	return p
}

func TestExitIsRecorded(t *testing.T) {
	tests := []struct {
		name     string
		script   string
		wantErr  string
		wantDiag string
		exitCode int // -1: killed by a signal; 0: no *exec.ExitError
	}{
		{"success", "true", "prog exited", "", 0},
		{"exit status and stderr", "echo oops >&2; exit 3", "prog exited: exit status 3", "\nprog stderr:\noops", 3},
		{"killed by a signal", "echo dying >&2; kill -KILL $$", "prog exited: signal: killed", "\nprog stderr:\ndying", -1},
		{"stdout is not quoted", "echo to-stdout; exit 1", "prog exited: exit status 1", "", 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := start(t, shell(tt.script))
			if p.PID() <= 0 {
				t.Errorf("PID %d", p.PID())
			}
			waitExited(t, p)
			err := p.ExitError()
			if err == nil || err.Error() != tt.wantErr {
				t.Errorf("ExitError %v, want %q", err, tt.wantErr)
			}
			var ee *exec.ExitError
			switch {
			case tt.exitCode == 0 && errors.As(err, &ee):
				t.Errorf("ExitError wraps %v, want no *exec.ExitError", ee)
			case tt.exitCode != 0 && (!errors.As(err, &ee) || ee.ExitCode() != tt.exitCode):
				t.Errorf("ExitError %v does not wrap an *exec.ExitError with code %d", err, tt.exitCode)
			}
			if got := p.Diagnostics(); got != tt.wantDiag {
				t.Errorf("Diagnostics %q, want %q", got, tt.wantDiag)
			}
		})
	}
}

func TestExitErrorIsNilWhileRunning(t *testing.T) {
	p := start(t, shell("exec sleep 60"))
	if err := p.ExitError(); err != nil {
		t.Errorf("ExitError while running: %v", err)
	}
}

func TestStartFailure(t *testing.T) {
	cfg := shell("true")
	cfg.Path = "/nonexistent/prog"
	p, err := Start(cfg)
	if err == nil {
		p.Kill()
		t.Fatal("Start succeeded")
	}
	if !strings.Contains(err.Error(), "run /nonexistent/prog") {
		t.Errorf("error %q does not say what was run", err)
	}
}

func TestStderrTailIsBounded(t *testing.T) {
	tests := []struct {
		name      string
		tailBytes int
		script    string
		want      string
	}{
		{"only the end is kept", 16, `i=0; while [ $i -lt 200 ]; do printf 'line %d\n' $i >&2; i=$((i+1)); done; echo THE-END >&2`, "\nprog stderr:\nine 199\nTHE-END"},
		{"default keeps 8 KiB", 0, `head -c 20000 /dev/zero | tr '\0' x >&2`, "\nprog stderr:\n" + strings.Repeat("x", DefaultTailBytes)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := shell(tt.script)
			cfg.TailBytes = tt.tailBytes
			p := start(t, cfg)
			waitExited(t, p)
			if got := p.Diagnostics(); got != tt.want {
				t.Errorf("Diagnostics %q (%d bytes), want %q", got, len(got), tt.want)
			}
		})
	}
}

// Every stderr line reaches StderrLine, the last one even without a newline, before Exited is closed.
func TestStderrLinesArriveBeforeExited(t *testing.T) {
	var mu sync.Mutex
	var lines []string
	cfg := shell(`echo one >&2; echo >&2; sleep 0.1; printf 'two\nthree' >&2`)
	cfg.StderrLine = func(_ *logrus.Entry, l string) {
		mu.Lock()
		lines = append(lines, l)
		mu.Unlock()
	}
	p := start(t, cfg)
	waitExited(t, p)
	mu.Lock()
	got := strings.Join(lines, "|")
	mu.Unlock()
	if want := "one||two|three"; got != want {
		t.Errorf("lines %q, want %q", got, want)
	}
}

// A program whose stdout someone else keeps open (here a descendant in a session of its own, which Stop's group
// signal does not reach) still counts as exited soon after it ends, and its stdout up to then is kept.
func TestExitWhileStdoutIsHeldElsewhere(t *testing.T) {
	var stdout bytes.Buffer
	marker := fmt.Sprintf("sleep 59.%d", os.Getpid()) // a duration no other sleep has, for pkill
	cfg := shell(`echo before; setsid ` + marker + ` & exit 0`)
	cfg.Stdout = &stdout
	p := start(t, cfg)
	defer func() { _ = exec.Command("pkill", "-f", marker).Run() }()
	waitExited(t, p)
	if !strings.HasPrefix(stdout.String(), "before\n") {
		t.Errorf("stdout %q, want what came before the exit", stdout.String())
	}
}

func TestExtraFilesAndStdout(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	var stdout bytes.Buffer
	cfg := shell(`echo to-fd3 >&3; echo to-fd4 >&4; echo to-stdout; pwd >&4`)
	cfg.ExtraFiles = []*os.File{w, w}
	cfg.Stdout = &stdout
	cfg.Dir = t.TempDir()
	p := start(t, cfg)
	w.Close()
	waitExited(t, p)
	got, err := io.ReadAll(r)
	if err != nil {
		t.Fatal(err)
	}
	if want := "to-fd3\nto-fd4\n" + cfg.Dir + "\n"; string(got) != want {
		t.Errorf("descriptors 3 and 4 got %q, want %q", got, want)
	}
	if stdout.String() != "to-stdout\n" {
		t.Errorf("stdout %q", stdout.String())
	}
}

func TestStop(t *testing.T) {
	tests := []struct {
		name        string
		script      string
		quit        bool // Config.Quit sends SIGUSR1 instead of SIGTERM to the group
		quitHangs   bool // Config.Quit never answers (a VMM whose QMP is stuck): it returns only when its ctx ends
		stopTimeout time.Duration
		ctxTimeout  time.Duration
		wantErr     string
		minTime     time.Duration
		maxTime     time.Duration
	}{
		{
			name: "SIGTERM ends a program that honours it", script: `echo ready >&2; exec sleep 60`,
			stopTimeout: time.Minute, wantErr: "prog exited: signal: terminated", maxTime: 10 * time.Second,
		},
		{
			name: "SIGKILL after the timeout for a program ignoring SIGTERM", script: `trap '' TERM; echo ready >&2; exec sleep 60`,
			stopTimeout: 300 * time.Millisecond, wantErr: "prog exited: signal: killed", minTime: 300 * time.Millisecond, maxTime: 10 * time.Second,
		},
		{
			name: "SIGKILL when ctx ends", script: `trap '' TERM; echo ready >&2; exec sleep 60`,
			stopTimeout: time.Minute, ctxTimeout: 200 * time.Millisecond, wantErr: "prog exited: signal: killed", minTime: 200 * time.Millisecond, maxTime: 10 * time.Second,
		},
		{
			name: "Quit replaces SIGTERM", script: `trap 'exit 7' USR1; trap 'exit 9' TERM; echo ready >&2; while :; do sleep 0.05; done`,
			quit: true, stopTimeout: time.Minute, wantErr: "prog exited: exit status 7", maxTime: 10 * time.Second,
		},
		{
			name: "SIGKILL after the timeout when Quit is not heard", script: `trap '' USR1 TERM; echo ready >&2; exec sleep 60`,
			quit: true, stopTimeout: 300 * time.Millisecond, wantErr: "prog exited: signal: killed", minTime: 300 * time.Millisecond, maxTime: 10 * time.Second,
		},
		{
			name: "SIGKILL after the timeout when Quit itself hangs", script: `trap '' TERM; echo ready >&2; exec sleep 60`,
			quitHangs: true, stopTimeout: 300 * time.Millisecond, wantErr: "prog exited: signal: killed", minTime: 300 * time.Millisecond, maxTime: 10 * time.Second,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := shell(tt.script)
			cfg.StopTimeout = tt.stopTimeout
			var p *Process
			if tt.quit {
				cfg.Quit = func(context.Context) error { return unix.Kill(p.PID(), unix.SIGUSR1) }
			}
			if tt.quitHangs {
				cfg.Quit = func(ctx context.Context) error { <-ctx.Done(); return ctx.Err() }
			}
			p = startReady(t, cfg)
			// Taken before ctx's deadline is set, which Stop's time is measured against.
			begin := time.Now()
			ctx := context.Background()
			if tt.ctxTimeout > 0 {
				var cancel context.CancelFunc
				ctx, cancel = context.WithTimeout(ctx, tt.ctxTimeout)
				defer cancel()
			}
			p.Stop(ctx)
			took := time.Since(begin)
			select {
			case <-p.Exited():
			default:
				t.Fatal("Stop returned before the program exited")
			}
			if err := p.ExitError(); err == nil || err.Error() != tt.wantErr {
				t.Errorf("ExitError %v, want %q", err, tt.wantErr)
			}
			if took < tt.minTime || took > tt.maxTime {
				t.Errorf("Stop took %s, want %s to %s", took, tt.minTime, tt.maxTime)
			}
		})
	}
}

// Stop reaches what the program forked into its group, even after the program itself has gone: virtiofsd's
// sandboxed child.
func TestStopKillsTheGroup(t *testing.T) {
	pidFile := t.TempDir() + "/pid"
	cfg := shell(fmt.Sprintf(`(trap '' TERM; exec sleep 60) & echo $! > %s; echo ready >&2`, pidFile))
	cfg.StopTimeout = 200 * time.Millisecond
	p := startReady(t, cfg)
	straggler := readPid(t, pidFile)
	// The leader exits at once; the straggler holds its stderr, so the program does not count as exited.
	select {
	case <-p.Exited():
		t.Fatal("Exited closed while a member of the group holds stderr")
	case <-time.After(300 * time.Millisecond):
	}
	p.Stop(context.Background())
	// Its stderr closes a moment before it turns into a zombie.
	if !gone(straggler, 2*time.Second) {
		t.Errorf("forked process %d survived Stop", straggler)
	}
}

func TestStopIsIdempotent(t *testing.T) {
	p := startReady(t, shell(`echo ready >&2; exec sleep 60`))
	var wg sync.WaitGroup
	for range 3 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p.Stop(context.Background())
		}()
	}
	wg.Wait()
	p.Stop(context.Background())
	p.Kill()
	if err := p.ExitError(); err == nil || !strings.Contains(err.Error(), "terminated") {
		t.Errorf("ExitError %v", err)
	}

	// A program that ended on its own.
	q := start(t, shell("exit 4"))
	waitExited(t, q)
	q.Stop(context.Background())
	if err := q.ExitError(); err == nil || err.Error() != "prog exited: exit status 4" {
		t.Errorf("ExitError after Stop of an exited program: %v", err)
	}
}

// stateOf is the state letter of process pid (/proc/<pid>/stat: "T" stopped, "Z" zombie, ...); false when the
// process is gone.
func stateOf(pid int) (string, bool) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return "", false
	}
	// The state follows the parenthesised command name, which may hold spaces.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 || i+3 > len(b) {
		return "", true
	}
	return string(b[i+2 : i+3]), true
}

// alive reports whether pid is a live process: a zombie counts as gone (PID 1 of these machines may not reap
// orphans).
func alive(pid int) bool {
	st, ok := stateOf(pid)
	return ok && st != "Z" && st != "X"
}

// gone waits up to timeout for pid to be gone.
func gone(pid int, timeout time.Duration) bool {
	deadline := time.Now().Add(timeout)
	for alive(pid) {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(10 * time.Millisecond)
	}
	return true
}

// execedCmdline reads pid's command line, waiting up to timeout for it to be there. exec's caller learns that the
// exec succeeded once the new program's memory is in place, which is before the kernel has copied the arguments
// into it: a read in between finds an empty command line.
func execedCmdline(pid int, timeout time.Duration) []byte {
	deadline := time.Now().Add(timeout)
	for {
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if len(b) > 0 || time.Now().After(deadline) {
			return b
		}
		time.Sleep(time.Millisecond)
	}
}

const helperEnv = "KILN_CHILD_TEST_HELPER"

// TestMain lets the test binary act as a parent process that is killed: it starts `sleep` through Start,
// prints the sleep's pid and waits to be killed.
func TestMain(m *testing.M) {
	if os.Getenv(helperEnv) == "1" {
		p, err := Start(Config{Name: "sleep", Path: "sleep", Args: []string{"60"}, Log: quietLog()})
		if err != nil {
			fmt.Println("error:", err)
			os.Exit(1)
		}
		fmt.Println(p.PID())
		<-p.Exited()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// The program dies with Kiln even when Kiln is killed with SIGKILL and cannot stop it.
func TestParentDeathKillsTheProgram(t *testing.T) {
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	parent := exec.Command(self)
	parent.Env = append(os.Environ(), helperEnv+"=1")
	parent.Stderr = os.Stderr
	out, err := parent.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := parent.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = parent.Process.Kill(); _ = parent.Wait() }()
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		t.Fatalf("read the program's pid from the parent: %v", err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(line))
	if err != nil {
		t.Fatalf("parent said %q", line)
	}
	if cmdline := execedCmdline(pid, 5*time.Second); !bytes.HasPrefix(cmdline, []byte("sleep\x00")) {
		t.Fatalf("pid %d is %q, not the sleep the parent started", pid, cmdline)
	}
	if err := parent.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	_ = parent.Wait()
	if !gone(pid, 5*time.Second) {
		_ = unix.Kill(pid, unix.SIGKILL)
		t.Fatalf("program %d outlived its killed parent", pid)
	}
}

// Once a program has exited and been stopped, nothing of it is left running in Kiln: no goroutine copying its
// output, none waiting for it.
func TestNoGoroutineLeak(t *testing.T) {
	before := runtime.NumGoroutine()
	scripts := []struct {
		script string
		stop   bool
	}{
		{"exit 0", false},
		{"echo err >&2; echo out; exit 1", false},
		{"echo ready >&2; exec sleep 60", true},
		{"trap '' TERM; echo ready >&2; exec sleep 60", true},
	}
	for _, s := range scripts {
		cfg := shell(s.script)
		cfg.Stdout = io.Discard
		cfg.StopTimeout = 100 * time.Millisecond
		var p *Process
		if s.stop {
			p = startReady(t, cfg)
			p.Stop(context.Background())
		} else {
			cfg.StderrLine = func(*logrus.Entry, string) {}
			p = start(t, cfg)
			waitExited(t, p)
		}
	}
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > before && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if n := runtime.NumGoroutine(); n > before {
		buf := make([]byte, 1<<20)
		t.Errorf("%d goroutines before, %d after:\n%s", before, n, buf[:runtime.Stack(buf, true)])
	}
}

// A program started with NoHugePages runs without transparent huge pages, as the kernel reports in its status.
func TestNoHugePages(t *testing.T) {
	var stdout bytes.Buffer
	cfg := shell(`grep THP_enabled /proc/self/status`)
	cfg.NoHugePages = true
	cfg.Stdout = &stdout
	waitExited(t, start(t, cfg))
	if got := strings.Join(strings.Fields(stdout.String()), " "); got != "THP_enabled: 0" {
		t.Errorf("the program's status says %q, want THP_enabled: 0", got)
	}
}

// processState is the state letter of process pid, which must exist.
func processState(t *testing.T, pid int) string {
	t.Helper()
	st, ok := stateOf(pid)
	if !ok || st == "" {
		t.Fatalf("process %d: no state in /proc/%d/stat", pid, pid)
	}
	return st
}

// waitState waits up to 5 s for each of pids to be stopped (stopped) or not.
func waitState(t *testing.T, stopped bool, pids ...int) {
	t.Helper()
	for _, pid := range pids {
		for deadline := time.Now().Add(5 * time.Second); (processState(t, pid) == "T") != stopped; time.Sleep(10 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("process %d in state %s, want stopped %v", pid, processState(t, pid), stopped)
			}
		}
	}
}

// Hold stops the program and what it forked into its group, and lets them go on; Stop ends a held program at its
// request to quit, not after the timeout's SIGKILL: a stopped program hears no SIGTERM until it is continued.
func TestHold(t *testing.T) {
	pidFile := t.TempDir() + "/pid"
	cfg := shell(fmt.Sprintf(`sleep 60 & echo $! > %s; echo ready >&2; wait`, pidFile))
	cfg.StopTimeout = time.Minute
	p := startReady(t, cfg)
	forked := readPid(t, pidFile)
	p.Hold(true)
	waitState(t, true, p.PID(), forked)
	p.Hold(false)
	waitState(t, false, p.PID(), forked)
	p.Hold(true)
	waitState(t, true, p.PID(), forked)
	begin := time.Now()
	p.Stop(context.Background())
	if took := time.Since(begin); took > 10*time.Second {
		t.Errorf("Stop of a held program took %s", took)
	}
	if err := p.ExitError(); err == nil || err.Error() != "prog exited: signal: terminated" {
		t.Errorf("ExitError %v, want the SIGTERM's", err)
	}
	// Holding a program that is gone is nothing.
	p.Hold(true)
}

// readPid reads the pid a test's program wrote to path (`echo $! > path`) before it said it was ready.
func readPid(t *testing.T, path string) int {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		t.Fatal(err)
	}
	return pid
}

// A confined program inherits the forking thread's Landlock domain: it cannot create a file that Kiln, after it,
// can; and it lives on past the start (its parent-death signal is tied to the thread Start keeps for it).
func TestConfine(t *testing.T) {
	if confine.ABI() == 0 {
		t.Skip("the kernel has no Landlock")
	}
	dir := t.TempDir()
	cfg := shell(`touch "$1/by-program" && echo wrote >&2; echo ready >&2; exec sleep 60`)
	cfg.Args = append(cfg.Args, "sh", dir)
	cfg.Batch = true
	// Without Stdout, exec opens /dev/null for writing on the confined thread: Start says so.
	cfg.Confine = func(writes []string) error { _, err := confine.Policy{Writable: writes}.Thread(); return err }
	p := startReady(t, cfg)
	time.Sleep(200 * time.Millisecond)
	if !alive(p.PID()) {
		t.Fatalf("the confined program ended after its start: %v", p.ExitError())
	}
	if _, err := os.Stat(filepath.Join(dir, "by-program")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the confined program made a file (%v); stderr %q", err, p.Diagnostics())
	}
	if err := os.WriteFile(filepath.Join(dir, "by-kiln"), nil, 0o600); err != nil {
		t.Errorf("Kiln cannot write after starting a confined program: %v", err)
	}
	p.Kill()
	waitExited(t, p)

	cfg.Confine = func([]string) error { return errors.New("no domain") }
	if _, err := Start(cfg); err == nil || !strings.Contains(err.Error(), "confine: no domain") {
		t.Errorf("Start with a failing Confine: %v, want its error", err)
	}
}
