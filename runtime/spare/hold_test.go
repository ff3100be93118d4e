package spare

import (
	"io"
	"os"
	"os/exec"
	"sync"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"
)

// program stands for a program of a spare's VM (QEMU, virtiofsd): it records whether it is held.
type program struct {
	mu   sync.Mutex
	held bool
}

func (p *program) Hold(on bool) {
	p.mu.Lock()
	p.held = on
	p.mu.Unlock()
}

func (p *program) isHeld() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.held
}

// waitHeld waits up to 5 s for each program to be held (held) or not, then checks it stays so for a moment.
func waitHeld(t *testing.T, held bool, ps ...*program) {
	t.Helper()
	for _, p := range ps {
		for deadline := time.Now().Add(5 * time.Second); p.isHeld() != held; time.Sleep(5 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("program held %v, want %v", p.isHeld(), held)
			}
		}
	}
	time.Sleep(50 * time.Millisecond)
	for _, p := range ps {
		if p.isHeld() != held {
			t.Fatalf("program held %v a moment later, want %v", p.isHeld(), held)
		}
	}
}

func quietLog() *logrus.Entry {
	l := logrus.New()
	l.SetOutput(io.Discard)
	return logrus.NewEntry(l)
}

// holderOf listens for holds in slot 0 of the containerd at address in dir, as a booting spare's Holder does, and
// has been handed a first program.
func holderOf(t *testing.T, dir, address string, max time.Duration) (*Holder, *program) {
	t.Helper()
	h, err := listenHolds(socketPath(dir, address, 0)+holdSuffix, max, quietLog())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(h.Close)
	p := &program{}
	h.Add(p)
	return h, p
}

func closeAll(fs []*os.File) {
	for _, f := range fs {
		_ = f.Close()
	}
}

// A spare stands still while any start holds it: the programs of its VM stop at the first hold, a program that
// starts meanwhile stops at once, and they go on once the last hold ends.
func TestHolderStopsItsProgramsWhileHeld(t *testing.T) {
	dir, ctx := t.TempDir(), testCtx(t)
	h, virtiofsd := holderOf(t, dir, "/c.sock", time.Minute)
	qemu := &program{}
	if other := hold(ctx, dir, "/other.sock"); len(other) != 0 {
		t.Fatalf("holds of another containerd's spares: %d", len(other))
	}
	first := hold(ctx, dir, "/c.sock")
	if len(first) != 1 {
		t.Fatalf("%d holds, want the booting spare's", len(first))
	}
	waitHeld(t, true, virtiofsd)
	h.Add(qemu)
	waitHeld(t, true, qemu)
	second := hold(ctx, dir, "/c.sock")
	closeAll(first)
	waitHeld(t, true, qemu, virtiofsd)
	closeAll(second)
	waitHeld(t, false, qemu, virtiofsd)
	if s := h.StoodStill(); s < 100*time.Millisecond || s > 10*time.Second {
		t.Errorf("stood still for %s", s)
	}
	// A holder that sends anything lets go too.
	third := hold(ctx, dir, "/c.sock")
	waitHeld(t, true, qemu, virtiofsd)
	if _, err := third[0].Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	waitHeld(t, false, qemu, virtiofsd)
	closeAll(third)
}

// However long starts hold it, a spare stands still for its limit in all, then goes on and takes no more holds.
func TestHolderRunsOut(t *testing.T) {
	dir, ctx := t.TempDir(), testCtx(t)
	const limit = 300 * time.Millisecond
	h, p := holderOf(t, dir, "/c.sock", limit)
	first := hold(ctx, dir, "/c.sock")
	defer closeAll(first)
	waitHeld(t, true, p)
	waitHeld(t, false, p)
	second := hold(ctx, dir, "/c.sock")
	defer closeAll(second)
	waitHeld(t, false, p)
	if s := h.StoodStill(); s < limit || s > limit+time.Second {
		t.Errorf("stood still for %s, want its limit %s", s, limit)
	}
}

// A spare held before its VM has a program (still setting up its share) stands still from its first program on:
// the time before is not counted against its limit, since nothing stood still.
func TestHolderCountsFromItsFirstProgram(t *testing.T) {
	dir, ctx := t.TempDir(), testCtx(t)
	const limit = 300 * time.Millisecond
	h, err := listenHolds(socketPath(dir, "/c.sock", 0)+holdSuffix, limit, quietLog())
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	holds := hold(ctx, dir, "/c.sock")
	defer closeAll(holds)
	time.Sleep(2 * limit)
	if s := h.StoodStill(); s != 0 {
		t.Errorf("stood still for %s with no program", s)
	}
	p := &program{}
	h.Add(p)
	waitHeld(t, true, p)
	waitHeld(t, false, p)
	if s := h.StoodStill(); s < limit || s > limit+time.Second {
		t.Errorf("stood still for %s, want its limit %s", s, limit)
	}
}

// A hold passed on to another process lasts as long as that process holds it: when it dies (a task's shim
// killed while it starts), the kernel closes its end and the spare goes on.
func TestHoldEndsWithItsHolder(t *testing.T) {
	dir, ctx := t.TempDir(), testCtx(t)
	_, p := holderOf(t, dir, "/c.sock", time.Minute)
	holds := hold(ctx, dir, "/c.sock")
	cmd := exec.Command("sleep", "60")
	PassHolds(cmd, holds)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
	closeAll(holds)
	waitHeld(t, true, p)
	_ = cmd.Process.Kill()
	_ = cmd.Wait()
	waitHeld(t, false, p)
}

// Once its boot is over a spare lets go of its programs, drops the holds and removes its hold socket: a later
// start holds nothing.
func TestHolderClose(t *testing.T) {
	dir, ctx := t.TempDir(), testCtx(t)
	h, p := holderOf(t, dir, "/c.sock", time.Minute)
	holds := hold(ctx, dir, "/c.sock")
	defer closeAll(holds)
	waitHeld(t, true, p)
	h.Close()
	waitHeld(t, false, p)
	if _, err := os.Stat(socketPath(dir, "/c.sock", 0) + holdSuffix); !os.IsNotExist(err) {
		t.Errorf("hold socket after Close: %v", err)
	}
	if late := hold(ctx, dir, "/c.sock"); len(late) != 0 {
		closeAll(late)
		t.Errorf("%d holds of a spare that is done booting", len(late))
	}
	h.Add(&program{})
}

// PassHolds names the descriptors the program finds its holds on; Inherited takes exactly those that are sockets
// above the shim's own, makes them close-on-exec and clears the environment; Release closes them, once.
func TestPassedHoldsAreInherited(t *testing.T) {
	a, b, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	defer b.Close()
	cmd := exec.Command("true")
	cmd.ExtraFiles = []*os.File{a}
	PassHolds(cmd, []*os.File{a, b})
	if want := HoldsEnv + "=4,5"; len(cmd.ExtraFiles) != 3 || cmd.Env[len(cmd.Env)-1] != want {
		t.Fatalf("ExtraFiles %d, environment %v; want 3 and %s", len(cmd.ExtraFiles), cmd.Env, want)
	}

	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fds[1])
	const held, notSocket = 100, 101
	if err := unix.Dup3(fds[0], held, 0); err != nil {
		t.Fatal(err)
	}
	_ = unix.Close(fds[0])
	if err := unix.Dup3(int(a.Fd()), notSocket, 0); err != nil {
		t.Fatal(err)
	}
	defer unix.Close(notSocket)
	t.Setenv(HoldsEnv, "100,101,x,2,102")
	h := Inherited()
	if _, ok := os.LookupEnv(HoldsEnv); ok {
		t.Errorf("%s still set", HoldsEnv)
	}
	if flags, err := unix.FcntlInt(held, unix.F_GETFD, 0); err != nil || flags&unix.FD_CLOEXEC == 0 {
		t.Errorf("inherited hold's descriptor flags %#x, %v: want close-on-exec", flags, err)
	}
	if flags, err := unix.FcntlInt(notSocket, unix.F_GETFD, 0); err != nil || flags&unix.FD_CLOEXEC != 0 {
		t.Errorf("a descriptor that is no socket was touched: flags %#x, %v", flags, err)
	}
	if n := h.Release(); n != 1 {
		t.Errorf("released %d holds, want 1", n)
	}
	if _, err := unix.FcntlInt(held, unix.F_GETFD, 0); err == nil {
		t.Error("the hold's descriptor is open after Release")
	}
	if n := h.Release(); n != 0 {
		t.Errorf("second Release released %d", n)
	}
	if none := Inherited(); none != nil || none.Release() != 0 {
		t.Errorf("holds without %s: %+v", HoldsEnv, none)
	}
}
