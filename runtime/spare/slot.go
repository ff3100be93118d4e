package spare

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Dir holds the slots: a socket, its lock and a log per spare, up to a pool's size per containerd. Not under
// Kiln's state directory, because `start` does not know Kiln's configuration (containerd passes its runtime options
// with Create only).
const Dir = "/run/kiln/spare"

// errTaken is returned by claim when another spare holds the slot: Spawn passes it over.
var errTaken = errors.New("another spare shim holds the slot")

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
func listening(dir, address string) []string { return slotPaths(dir, address, "") }

// slotPaths lists the files of the containerd's slots that exist, by the suffix of their socket's path that names
// them ("" for the socket itself).
func slotPaths(dir, address, suffix string) []string {
	prefix := slotPrefix(dir, address)
	first, _ := filepath.Glob(prefix + ".sock" + suffix)
	rest, _ := filepath.Glob(prefix + "-*.sock" + suffix)
	return append(first, rest...)
}

// Slot is the place a spare waits in: the lock that keeps it the only spare in it, and the socket `start` finds it
// by.
type Slot struct {
	path    string
	address string // the containerd's
	lock    *os.File
	l       *net.UnixListener
}

// Claimed is slot i of the containerd at address, whose lock this process's spawner took for it (Spawn) and left at
// LockFD. It listens only once Wait is called: until then `start` finds no spare.
func Claimed(address string, i int) (*Slot, error) {
	path := socketPath(Dir, address, i)
	if err := isFile(LockFD, path+".lock"); err != nil {
		return nil, fmt.Errorf("spare shim: descriptor %d is not the lock of slot %s (spares are started by spare.Spawn): %w", LockFD, path, err)
	}
	// Nothing the spare starts (QEMU, virtiofsd) may hold the slot after it.
	unix.CloseOnExec(LockFD)
	return &Slot{path: path, address: address, lock: os.NewFile(LockFD, path+".lock")}, nil
}

// errOtherFile is isFile's answer for a descriptor that is not the named file.
var errOtherFile = errors.New("another file")

// isFile says (nil) whether descriptor fd is the file named path: a lock file a claimer recreated since is
// another.
func isFile(fd int, path string) error {
	var held, named unix.Stat_t
	if err := unix.Fstat(fd, &held); err != nil {
		return err
	}
	if err := unix.Stat(path, &named); err != nil {
		return err
	}
	if held.Dev != named.Dev || held.Ino != named.Ino {
		return errOtherFile
	}
	return nil
}

// lockFile opens path, making it if need be, and takes its lock (lockOpen).
func lockFile(path string) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, err
	}
	return lockOpen(f, path)
}

// lockOpen takes the exclusive lock of f, opened at path, without waiting. It returns errTaken when another
// process holds it, or when the file at path is not f any more: a holder removes its lock file before it unlocks
// it (Slot.release, Turn.Release), so a lock taken on a file removed or replaced meanwhile guards nothing. f is
// closed unless it is returned locked.
func lockOpen(f *os.File, path string) (*os.File, error) {
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		_ = f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, errTaken
		}
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	if err := isFile(int(f.Fd()), path); err != nil {
		_ = f.Close()
		if errors.Is(err, errOtherFile) || errors.Is(err, os.ErrNotExist) {
			return nil, errTaken
		}
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	return f, nil
}

// claim takes slot i of the containerd at address, or returns errTaken. Its lock names nobody until name: a spawner
// names the spare once it has started it.
func claim(dir, address string, i int) (*Slot, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("spare shim directory: %w", err)
	}
	path := socketPath(dir, address, i)
	lock, err := lockFile(path + ".lock")
	if err != nil {
		if errors.Is(err, errTaken) {
			return nil, errTaken
		}
		return nil, fmt.Errorf("spare shim lock: %w", err)
	}
	_ = lock.Truncate(0)
	// Sockets here are a killed spare's (the lock says no live spare owns them): gone now, whether or not this
	// spare lives to listen, so that `start` does not dial them and nothing of the dead spare stays.
	for _, p := range []string{path, path + holdSuffix} {
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			_ = lock.Close()
			return nil, fmt.Errorf("spare shim socket: %w", err)
		}
	}
	// The log is the holder's from here on: what a spare that failed before left in it goes.
	if err := os.Truncate(path+".log", 0); err != nil && !errors.Is(err, os.ErrNotExist) {
		_ = lock.Close()
		return nil, fmt.Errorf("spare shim log: %w", err)
	}
	return &Slot{path: path, address: address, lock: lock}, nil
}

// name writes the slot's holder into its lock, for whoever must stop it (`make uninstall`, tests, `kiln check`).
func (s *Slot) name(holder int) {
	_, _ = s.lock.WriteAt([]byte(fmt.Sprintf("%d %s\n", holder, s.address)), 0)
}

// Info describes a spare shim that holds a slot, or that left one without giving it up (Failed).
type Info struct {
	// Pid is the spare's process id, Address its containerd's.
	Pid     int
	Address string
	// Ready says it waits for a task; otherwise it is still booting or warming its VM.
	Ready bool
	// Queued, when not zero, is its place in the host's queue for boot turns (1 for the next to boot): it waits
	// for CPUs other spares boot on (WaitTurn).
	Queued int
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

// readLock reads a lock file that names its holder (a slot's, a place in the turns' queue): the pid written first
// in it, what follows the pid on its line, and whether no live spare holds the lock (the file outlives its last
// spare; a file that is gone is held by none). ok is false for a file that cannot be read or names no pid: one
// that is held all the same (free false) is a slot whose spawner has not named its spare yet (Spawn).
func readLock(path string) (pid int, rest string, free, ok bool) {
	f, err := os.Open(path)
	if err != nil {
		return 0, "", errors.Is(err, os.ErrNotExist), false
	}
	defer f.Close()
	// The shared lock taken when it can be goes with the close.
	free = unix.Flock(int(f.Fd()), unix.LOCK_SH|unix.LOCK_NB) == nil
	b := make([]byte, 4096)
	n, _ := f.ReadAt(b, 0)
	pidText, rest, _ := strings.Cut(strings.TrimSpace(string(b[:n])), " ")
	pid, err = strconv.Atoi(pidText)
	if err != nil || pid <= 0 {
		return 0, "", free, false
	}
	return pid, rest, free, true
}

// scan reads the slots in dir: those a live spare holds, and those a spare left without giving them up.
func scan(dir string) (held, failed []Info) {
	held, failed, _ = scanSlots(dir)
	return held, failed
}

// scanSlots is scan, and the slots held by a spawner that has not named its spare yet (naming): a spare is
// starting in each.
func scanSlots(dir string) (held, failed []Info, naming []string) {
	locks, _ := filepath.Glob(filepath.Join(dir, "*.sock.lock"))
	for _, path := range locks {
		pid, address, free, ok := readLock(path)
		slot := strings.TrimSuffix(path, ".lock")
		switch {
		case !ok && !free:
			naming = append(naming, slot)
		case !ok:
		case free:
			failed = append(failed, Info{Pid: pid, Address: address, Slot: slot})
		default:
			_, err := os.Stat(slot)
			held = append(held, Info{Pid: pid, Address: address, Ready: err == nil, Slot: slot})
		}
	}
	queue := queued(dir)
	for i := range held {
		held[i].Queued = queue[held[i].Pid]
	}
	return held, failed, naming
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
	if isFile(int(s.lock.Fd()), s.path+".lock") == nil {
		if !keepLog {
			_ = os.Remove(s.path + ".log")
		}
		_ = os.Remove(s.path + ".lock")
	}
	_ = s.lock.Close()
}
