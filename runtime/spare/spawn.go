package spare

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"syscall"

	"golang.org/x/sys/unix"
)

// LockFD is the descriptor a spare finds its slot's lock on: Spawn takes the slot for the spare it starts, so that
// spawners that find the same slots free (tasks started together) start one spare per slot, not one each.
const LockFD = GateFD + 1

// SlotFlag is the spare's command-line flag that names its slot (Spawn's).
const SlotFlag = "slot"

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
		slot, err := claim(dir, address, i)
		if errors.Is(err, errTaken) {
			continue
		}
		if err == nil {
			err = slot.start(self, r, append([]string{SpareArg, "-address", address, "-" + SlotFlag, strconv.Itoa(i),
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

// start runs self with args as the spare of the slot, which it hands the slot's lock and the gate r, and names it
// in the lock; the slot is given up when it cannot.
func (s *Slot) start(self string, r *os.File, args []string) error {
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
	s.name(cmd.Process.Pid)
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
