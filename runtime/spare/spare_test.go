package spare

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// The hand-over carries the request and the server socket's descriptor (the same open file), and the spare's pid
// back; the slot is free for the next spare afterwards.
func TestHandOver(t *testing.T) {
	dir, ctx := t.TempDir(), testCtx(t)
	if _, err := adopt(ctx, dir, "/c.sock", Request{Args: []string{"x"}, Dir: "/"}, os.Stdin); !errors.Is(err, ErrNone) {
		t.Fatalf("Adopt with no spare = %v, want ErrNone", err)
	}
	slot, err := claimHere(dir, "/c.sock", 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := claimHere(dir, "/c.sock", 0); !errors.Is(err, errTaken) {
		t.Fatalf("second Claim = %v, want errTaken", err)
	}
	if other, err := claimHere(dir, "/other.sock", 0); err != nil {
		t.Fatalf("Claim for another containerd: %v", err)
	} else {
		other.release(false)
	}
	type got struct {
		req    Request
		socket *os.File
		err    error
	}
	done := make(chan got, 1)
	go func() {
		req, socket, err := slot.Wait(ctx, 5*time.Second, 4242, "v1", nil, nil)
		done <- got{req, socket, err}
	}()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	want := Request{Version: "v1", Args: []string{"shim", "-id", "c1"}, Env: []string{"A=b"}, Dir: "/bundle"}
	var pid int
	for deadline := time.Now().Add(5 * time.Second); ; {
		if pid, err = adopt(ctx, dir, "/c.sock", want, w); err == nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	_ = w.Close()
	if err != nil || pid != 4242 {
		t.Fatalf("Adopt = %d, %v; want 4242", pid, err)
	}
	g := <-done
	if g.err != nil {
		t.Fatal(g.err)
	}
	if g.req.Dir != want.Dir || len(g.req.Args) != 3 || g.req.Args[2] != "c1" || g.req.Env[0] != "A=b" {
		t.Errorf("spare got %+v, want %+v", g.req, want)
	}
	if _, err := g.socket.Write([]byte("through")); err != nil {
		t.Fatal(err)
	}
	_ = g.socket.Close()
	if b, _ := io.ReadAll(r); string(b) != "through" {
		t.Errorf("the handed descriptor is not the sender's file: read %q", b)
	}
	next, err := claimHere(dir, "/c.sock", 0)
	if err != nil {
		t.Fatalf("Claim after a hand-over: %v", err)
	}
	next.release(false)
}

// A spare that no task came for gives up after its idle time and leaves none of its slot's files behind.
func TestIdleSpareLeaves(t *testing.T) {
	dir, ctx := t.TempDir(), testCtx(t)
	slot, err := claimHere(dir, "/c.sock", 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(socketPath(dir, "/c.sock", 0)+".log", []byte("spare log\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if _, _, err := slot.Wait(ctx, 100*time.Millisecond, 1, "v1", nil, nil); err == nil {
		t.Fatal("Wait returned a task that nobody sent")
	}
	if time.Since(start) > 5*time.Second {
		t.Errorf("idle spare waited %s", time.Since(start))
	}
	if left, _ := os.ReadDir(dir); len(left) != 0 {
		t.Errorf("files left after the spare gave up: %v", left)
	}
	if _, err := adopt(ctx, dir, "/c.sock", Request{Args: []string{"x"}, Dir: "/"}, os.Stdin); !errors.Is(err, ErrNone) {
		t.Errorf("Adopt after the spare left = %v, want ErrNone", err)
	}
}

// A task from another version of the shim (an upgrade since the spare started) is refused: `start` starts the
// server itself, and the stale spare leaves.
func TestStaleSpareRefusesTheTask(t *testing.T) {
	dir, ctx := t.TempDir(), testCtx(t)
	done := waitInSlot(ctx, t, dir, 5*time.Second, "old", nil, nil)
	var adoptErr error
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if _, adoptErr = adopt(ctx, dir, "/c.sock", Request{Version: "new", Args: []string{"x"}, Dir: "/"}, os.Stdin); adoptErr == nil {
			break
		}
		select {
		case err := <-done:
			if !errors.Is(err, ErrStale) {
				t.Fatalf("stale spare's Wait = %v, want ErrStale", err)
			}
			if !errors.Is(adoptErr, ErrNone) {
				t.Errorf("Adopt of a stale spare = %v, want ErrNone", adoptErr)
			}
			return
		default:
		}
	}
	t.Fatalf("a stale spare took the task (Adopt = %v)", adoptErr)
}

// A task is offered to each waiting spare until one takes it: spares that decline it, or whose socket is left
// without a listener, are passed over.
func TestAdoptTriesEverySpare(t *testing.T) {
	dir, ctx := t.TempDir(), testCtx(t)
	// adopt starts at the slot its pid picks: the one that takes the task comes last, after two that decline it
	// and a killed spare's socket.
	from := os.Getpid() % 4
	var declining []<-chan error
	for j := 0; j < 2; j++ {
		slot, err := claimHere(dir, "/c.sock", (from+j)%4)
		if err != nil {
			t.Fatal(err)
		}
		declining = append(declining, waitIn(ctx, slot, time.Minute, "v1", nil, func(Request) error { return errors.New("another shape") }))
	}
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: socketPath(dir, "/c.sock", (from+2)%4), Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	l.SetUnlinkOnClose(false)
	_ = l.Close()
	taking, err := claimHere(dir, "/c.sock", (from+3)%4)
	if err != nil {
		t.Fatal(err)
	}
	took := waitIn(ctx, taking, time.Minute, "v1", nil, nil)
	for deadline := time.Now().Add(5 * time.Second); len(listening(dir, "/c.sock")) < 4; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the spares do not listen: %v", listening(dir, "/c.sock"))
		}
	}
	pid, err := adopt(ctx, dir, "/c.sock", Request{Version: "v1", Args: []string{"x"}, Dir: "/"}, os.Stdin)
	if err != nil || pid != 4242 {
		t.Fatalf("Adopt = %d, %v; want the spare that fits (4242)", pid, err)
	}
	if err := <-took; err != nil {
		t.Errorf("the fitting spare's Wait = %v", err)
	}
	if _, err := adopt(ctx, dir, "/c.sock", Request{Version: "v1", Args: []string{"x"}, Dir: "/"}, os.Stdin); !errors.Is(err, ErrNone) {
		t.Errorf("Adopt with only declining spares = %v, want ErrNone", err)
	}
	for i, done := range declining {
		select {
		case err := <-done:
			t.Errorf("declining spare %d left: %v", i, err)
		default:
		}
	}
}

// A spare whose VM ends while it waits gives the slot up at once with ErrLost: `start` then finds no spare, and
// the spare's log stays for whoever looks into why.
func TestLostSpareLeavesItsLog(t *testing.T) {
	dir, ctx := t.TempDir(), testCtx(t)
	slot, err := claimHere(dir, "/c.sock", 0)
	if err != nil {
		t.Fatal(err)
	}
	logPath := socketPath(dir, "/c.sock", 0) + ".log"
	if err := os.WriteFile(logPath, []byte("spare log\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	lost := make(chan struct{})
	done := waitIn(ctx, slot, time.Minute, "v1", lost, nil)
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if len(all(dir)) == 1 && all(dir)[0].Ready {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the spare never became ready")
		}
	}
	close(lost)
	select {
	case err := <-done:
		if !errors.Is(err, ErrLost) {
			t.Fatalf("Wait = %v, want ErrLost", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Wait went on after its spare was lost")
	}
	if _, err := adopt(ctx, dir, "/c.sock", Request{Args: []string{"x"}, Dir: "/"}, os.Stdin); !errors.Is(err, ErrNone) {
		t.Errorf("Adopt after the spare was lost = %v, want ErrNone", err)
	}
	if b, err := os.ReadFile(logPath); err != nil || string(b) != "spare log\n" {
		t.Errorf("the lost spare's log = %q (%v), want it kept", b, err)
	}
	if got := all(dir); len(got) != 0 {
		t.Errorf("all() after the spare was lost = %v", got)
	}
}

// all lists the slots live spares hold in dir, as All does in Dir.
func all(dir string) []Info {
	held, _ := scan(dir)
	return held
}

// A task the spare does not fit is declined before anything is taken: its `start` finds no spare (ErrNone) and
// keeps its socket, and the spare waits on for a task it fits.
func TestSpareDeclinesATaskItDoesNotFit(t *testing.T) {
	dir, ctx := t.TempDir(), testCtx(t)
	slot, err := claimHere(dir, "/c.sock", 0)
	if err != nil {
		t.Fatal(err)
	}
	fits := func(r Request) error {
		if r.Task != nil && r.Task.ConfigPath != "/fits.toml" {
			return errors.New("another configuration")
		}
		return nil
	}
	done := make(chan Request, 1)
	go func() {
		req, socket, err := slot.Wait(ctx, 10*time.Second, 4242, "v1", nil, fits)
		if err == nil {
			_ = socket.Close()
		}
		done <- req
	}()
	// Hands task over once the spare listens: a dial before that (no socket yet, or one bound but not yet
	// listening) is tried again.
	handOver := func(task *Task) (int, error) {
		for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
			pid, err := adopt(ctx, dir, "/c.sock", Request{Version: "v1", Args: []string{"shim"}, Dir: "/bundle", Task: task}, os.Stdin)
			if !beforeListen(err) || time.Now().After(deadline) {
				return pid, err
			}
		}
	}
	if _, err := handOver(&Task{ID: "c1", ConfigPath: "/other.toml"}); !errors.Is(err, ErrNone) {
		t.Fatalf("hand-over of a task the spare does not fit = %v, want ErrNone", err)
	}
	if pid, err := handOver(&Task{ID: "c2", ConfigPath: "/fits.toml"}); err != nil || pid != 4242 {
		t.Fatalf("hand-over of a task the spare fits = %d, %v; want 4242", pid, err)
	}
	if req := <-done; req.Task == nil || req.Task.ID != "c2" {
		t.Errorf("the spare took %+v, want task c2", req.Task)
	}
}

// A spare that declines maxDeclines tasks in a row leaves its slot (ErrUnwanted), so that the next task's shim can
// start a spare of the shape that comes now; tasks no shim would take (ErrRefused: a kubelet retrying a pod Kiln
// refuses) do not count.
func TestSpareLeavesAfterDecliningARun(t *testing.T) {
	dir, ctx := t.TempDir(), testCtx(t)
	var offered atomic.Int32
	done := waitInSlot(ctx, t, dir, time.Minute, "v1", nil, func(Request) error {
		if offered.Add(1) <= 2*maxDeclines {
			return fmt.Errorf("%w: hostPID", ErrRefused)
		}
		return errors.New("another shape")
	})
	declined := 0
	for deadline := time.Now().Add(10 * time.Second); declined < 3*maxDeclines; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("only %d hand-overs declined", declined)
		}
		if len(all(dir)) == 0 || !all(dir)[0].Ready {
			continue
		}
		_, err := adopt(ctx, dir, "/c.sock", Request{Version: "v1", Args: []string{"shim"}, Dir: "/", Task: &Task{ID: "c"}}, os.Stdin)
		if beforeListen(err) {
			continue
		}
		if !errors.Is(err, ErrNone) {
			t.Fatalf("a task the spare does not fit was taken: %v", err)
		}
		declined++
		if declined == 2*maxDeclines {
			select {
			case err := <-done:
				t.Fatalf("the spare left after %d refused tasks: %v", declined, err)
			case <-time.After(100 * time.Millisecond):
			}
		}
	}
	select {
	case err := <-done:
		if !errors.Is(err, ErrUnwanted) {
			t.Fatalf("Wait = %v, want ErrUnwanted", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatalf("the spare stayed after declining %d tasks in a row", declined)
	}
	if got := all(dir); len(got) != 0 {
		t.Errorf("all() after the spare left = %v", got)
	}
}

// beforeListen reports whether an adopt failed because it dialled before the spare listened: no socket yet, or
// one bound but not yet listening.
func beforeListen(err error) bool {
	return errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, os.ErrNotExist)
}

// waitInSlot claims dir's slot for /c.sock and waits in it in the background (waitIn).
func waitInSlot(ctx context.Context, t *testing.T, dir string, idle time.Duration, version string, lost <-chan struct{}, fits Fits) <-chan error {
	t.Helper()
	slot, err := claimHere(dir, "/c.sock", 0)
	if err != nil {
		t.Fatal(err)
	}
	return waitIn(ctx, slot, idle, version, lost, fits)
}

// waitIn runs slot.Wait in the background as spare 4242 of version, closing a socket it is handed; the channel
// gets Wait's error.
func waitIn(ctx context.Context, slot *Slot, idle time.Duration, version string, lost <-chan struct{}, fits Fits) <-chan error {
	done := make(chan error, 1)
	go func() {
		_, socket, err := slot.Wait(ctx, idle, 4242, version, lost, fits)
		if err == nil {
			_ = socket.Close()
		}
		done <- err
	}()
	return done
}

// TestUnconfirmedHandOverIsNotTaken: a `start` that reads the spare's pid but gives up before confirming (its
// deadline passed as the pid came) serves the task itself, so the spare must not: it waits on, and the next
// task's hand-over is its.
func TestUnconfirmedHandOverIsNotTaken(t *testing.T) {
	dir, ctx := t.TempDir(), testCtx(t)
	done := waitInSlot(ctx, t, dir, 5*time.Second, "v1", nil, nil)
	var c *net.UnixConn
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		nc, err := net.Dial("unix", socketPath(dir, "/c.sock", 0))
		if err == nil {
			c = nc.(*net.UnixConn)
			break
		}
		if time.Now().After(deadline) {
			t.Fatal(err)
		}
	}
	b, err := json.Marshal(Request{Version: "v1", Args: []string{"x"}, Dir: "/"})
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := c.WriteMsgUnix(b, unix.UnixRights(int(os.Stdin.Fd())), nil); err != nil {
		t.Fatal(err)
	}
	reply := make([]byte, 32)
	n, err := c.Read(reply)
	if err != nil || string(reply[:n]) != "4242" {
		t.Fatalf("spare answered %q, %v; want its pid", reply[:n], err)
	}
	_ = c.Close() // given up: no confirmation
	var pid int
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if pid, err = adopt(ctx, dir, "/c.sock", Request{Version: "v1", Args: []string{"x"}, Dir: "/"}, os.Stdin); err == nil || time.Now().After(deadline) {
			break
		}
	}
	if err != nil || pid != 4242 {
		t.Fatalf("the next hand-over = %d, %v; want the spare, which the unconfirmed one must not have taken", pid, err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// TestSpareWhoseSlotWentLeaves: a spare whose slot's lock file was removed (`make uninstall` removes the
// directory) is listed nowhere and stopped by nothing, so it must not wait on: before it listens it leaves
// without a socket; while it listens the next hand-over finds no spare and the spare leaves, and with its socket
// gone too (no hand-over can come) it leaves within its next look at the slot.
func TestSpareWhoseSlotWentLeaves(t *testing.T) {
	for _, when := range []string{"before it listens", "while it listens", "with its socket"} {
		t.Run(when, func(t *testing.T) {
			dir, ctx := t.TempDir(), testCtx(t)
			slot, err := claimHere(dir, "/c.sock", 0)
			if err != nil {
				t.Fatal(err)
			}
			path := socketPath(dir, "/c.sock", 0)
			if when == "before it listens" {
				if err := os.Remove(path + ".lock"); err != nil {
					t.Fatal(err)
				}
			}
			done := waitIn(ctx, slot, time.Minute, "v1", nil, nil)
			if when != "before it listens" {
				for deadline := time.Now().Add(5 * time.Second); len(all(dir)) != 1 || !all(dir)[0].Ready; time.Sleep(10 * time.Millisecond) {
					if time.Now().After(deadline) {
						t.Fatal("the spare never became ready")
					}
				}
				if err := os.Remove(path + ".lock"); err != nil {
					t.Fatal(err)
				}
				if when == "with its socket" {
					// No hand-over can come to tell it: it looks by itself.
					if err := os.Remove(path); err != nil {
						t.Fatal(err)
					}
				} else if pid, err := adopt(ctx, dir, "/c.sock", Request{Version: "v1", Args: []string{"x"}, Dir: "/"}, os.Stdin); !errors.Is(err, ErrNone) {
					t.Errorf("a hand-over to the spare whose slot went = %d, %v; want ErrNone", pid, err)
				}
			}
			select {
			case err := <-done:
				if !errors.Is(err, ErrSlotGone) {
					t.Fatalf("Wait = %v, want ErrSlotGone", err)
				}
			case <-time.After(5 * time.Second):
				t.Fatal("the spare whose slot went waits on")
			}
			if when == "before it listens" {
				if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
					t.Errorf("the spare made its socket %s after its slot went (%v)", path, err)
				}
			}
		})
	}
}

// Build tells two binaries of one version apart (a tree's "-dirty" builds, `make install` replacing the shim), and
// a process from itself: a spare of the replaced binary is stale to a task of the new one.
func TestBuildNamesTheBinary(t *testing.T) {
	if os.Getenv("KILN_TEST_PRINT_BUILD") == "1" {
		fmt.Print(Build("v1-dirty"))
		os.Exit(0)
	}
	self := Build("v1-dirty")
	if self != Build("v1-dirty") || !strings.HasPrefix(self, "v1-dirty+") {
		t.Fatalf("Build = %q, then %q", self, Build("v1-dirty"))
	}
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(exe)
	if err != nil {
		t.Fatal(err)
	}
	copied := filepath.Join(t.TempDir(), "shim")
	if err := os.WriteFile(copied, b, 0o755); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(copied, "-test.run=^TestBuildNamesTheBinary$")
	cmd.Env = append(os.Environ(), "KILN_TEST_PRINT_BUILD=1")
	out, err := cmd.Output()
	if err != nil {
		t.Fatal(err)
	}
	if other := string(out); other == self || !strings.HasPrefix(other, "v1-dirty+") {
		t.Errorf("another binary of the same version builds %q, this one %q", other, self)
	}
}
