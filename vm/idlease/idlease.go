// Package idlease leases host ids to VMs: each VM's QEMU runs as a uid, and a gid of the same number, that no other
// VM of the host and no other process holds while it runs. A QEMU a guest took over then reaches no other VM's
// QEMU as its owner could: not its memory through /proc/<pid>/fd or /proc/<pid>/mem, not its signals.
//
// A lease is a lock file, <dir>/<id>, held with flock(2) for as long as the VM's QEMU may run: the lock ends with
// the process holding it, so a killed shim leaves no id taken for good. Ids some process of the host runs with (as
// its effective uid or gid) are passed over, which covers a QEMU still dying after its shim, and users of the
// range outside Kiln.
package idlease

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"

	"golang.org/x/sys/unix"
)

// Dir is where Kiln keeps the leases: one place for the host, whatever runtime.state_dir each runtime entry has,
// since the ids are the host's.
const Dir = "/run/kiln/qemu-ids"

// Range is a span of host ids leased one per VM, and the directory holding the leases' lock files.
type Range struct {
	First, Count uint32
	Dir          string
	// Proc is where processes' status files are read; empty means /proc.
	Proc string
}

// Lease is one id held until Release.
type Lease struct {
	// ID is the uid, and gid, leased.
	ID   uint32
	path string
	f    *os.File
}

// Take leases the lowest id of the range that no other lease holds and no process runs with.
func (r Range) Take() (*Lease, error) {
	if r.Count == 0 {
		return nil, errors.New("lease an id: the range is empty")
	}
	if err := os.MkdirAll(r.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("lease an id: %w", err)
	}
	busy, err := inUse(r)
	if err != nil {
		return nil, fmt.Errorf("lease an id: %w", err)
	}
	for i := uint32(0); i < r.Count; i++ {
		id := r.First + i
		if busy[id] {
			continue
		}
		l, err := tryLock(filepath.Join(r.Dir, strconv.FormatUint(uint64(id), 10)))
		if err != nil {
			return nil, fmt.Errorf("lease id %d: %w", id, err)
		}
		if l != nil {
			l.ID = id
			return l, nil
		}
	}
	return nil, fmt.Errorf("lease an id: all %d ids from %d are taken (by VMs or other processes); widen hypervisor.user_range", r.Count, r.First)
}

// tryLock takes the lock file at p, or returns nil when another holds it.
func tryLock(p string) (*Lease, error) {
	for {
		f, err := os.OpenFile(p, os.O_CREATE|os.O_RDWR, 0o600)
		if err != nil {
			return nil, err
		}
		if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
			f.Close()
			if errors.Is(err, unix.EWOULDBLOCK) {
				return nil, nil
			}
			return nil, fmt.Errorf("lock %s: %w", p, err)
		}
		// A holder releasing removes the file, perhaps between this open and this lock: a lock on a file no
		// longer at p holds nothing, so open again.
		same, err := sameFile(f, p)
		if err != nil {
			f.Close()
			return nil, err
		}
		if same {
			return &Lease{path: p, f: f}, nil
		}
		f.Close()
	}
}

func sameFile(f *os.File, p string) (bool, error) {
	var a, b unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &a); err != nil {
		return false, err
	}
	if err := unix.Stat(p, &b); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return false, nil
		}
		return false, err
	}
	return a.Dev == b.Dev && a.Ino == b.Ino, nil
}

// Release gives the id back. Call it once nothing runs with the id any more (the VM's QEMU was reaped).
func (l *Lease) Release() error {
	if l == nil || l.f == nil {
		return nil
	}
	// Removed while still locked, so that no one locks the file as it goes (tryLock checks for that).
	err := os.Remove(l.path)
	if cerr := l.f.Close(); err == nil {
		err = cerr
	}
	l.f = nil
	return err
}

// inUse returns the ids of r that some process runs with, as its effective uid or gid: the owner of its /proc
// directory, which the kernel shows whether or not the process is dumpable. A stat each, where reading every
// process's status (its real and saved ids too) took ten times as long, on the path of every VM's start.
func inUse(r Range) (map[uint32]bool, error) {
	proc := r.Proc
	if proc == "" {
		proc = "/proc"
	}
	entries, err := os.ReadDir(proc)
	if err != nil {
		return nil, err
	}
	busy := map[uint32]bool{}
	in := func(id uint32) bool { return id >= r.First && id-r.First < r.Count }
	for _, e := range entries {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		var st unix.Stat_t
		if err := unix.Stat(filepath.Join(proc, e.Name()), &st); err != nil {
			continue // the process ended
		}
		for _, id := range []uint32{st.Uid, st.Gid} {
			if in(id) {
				busy[id] = true
			}
		}
	}
	return busy, nil
}
