package qemu

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"syscall"

	"github.com/kiln-runtime/kiln/config"
	"github.com/kiln-runtime/kiln/vm/accel"
	"github.com/kiln-runtime/kiln/vm/confine"
	"github.com/kiln-runtime/kiln/vm/idlease"
)

// kvmDevice is the node QEMU opens by path with hardware KVM (QEMU 7.2 takes no descriptor for it).
const kvmDevice = "/dev/kvm"

// Access bits for reachable.
const (
	mayRead  = 4
	mayWrite = 2
	mayExec  = 1
)

// leaseUser returns c with User set to an id leased from c.Users, and the lease, which the caller releases once
// the QEMU started with it was reaped; c as it is, and no lease, when User is set or Users is not.
func leaseUser(c Config) (Config, *idlease.Lease, error) {
	if c.User != nil || c.Users == nil {
		return c, nil, nil
	}
	l, err := c.Users.Take()
	if err != nil {
		return c, nil, fmt.Errorf("QEMU's user: %w", err)
	}
	c.User = &syscall.Credential{Uid: l.ID, Gid: l.ID}
	return c, l, nil
}

// qemuCredential is who QEMU runs as: Config.User, plus the group of /dev/kvm when the VM uses hardware KVM and
// that group may open it. nil means Kiln's own user.
func qemuCredential(c Config) *syscall.Credential {
	if c.User == nil {
		return nil
	}
	cred := *c.User
	cred.Groups = slices.Clone(c.User.Groups)
	if c.Accel == accel.KVM {
		if fi, err := os.Stat(kvmDevice); err == nil {
			st := fi.Sys().(*syscall.Stat_t)
			if fi.Mode().Perm()&0o060 == 0o060 && !slices.Contains(cred.Groups, st.Gid) && st.Gid != cred.Gid {
				cred.Groups = append(cred.Groups, st.Gid)
			}
		}
	}
	return &cred
}

// openedPath is a file QEMU opens by path, and how.
type openedPath struct {
	what, path string
	mode       uint32
}

// openedByPath lists the files QEMU opens by path: the kernel and initrd (read), and the memory file and the KVM
// device (read and write). Everything else it is given as a descriptor.
func openedByPath(c Config) []openedPath {
	files := []openedPath{{"guest kernel", c.Kernel, mayRead}, {"guest initrd", c.Initrd, mayRead}}
	if c.MemoryFile != "" {
		files = append(files, openedPath{"guest memory file", c.MemoryFile, mayRead | mayWrite})
	}
	if c.Accel == accel.KVM {
		files = append(files, openedPath{"KVM device", kvmDevice, mayRead | mayWrite})
	}
	return files
}

// confinement is QEMU's vm/child Confine with Config.Confine: it may write only /dev/null and the files it opens
// by path for writing. nil without.
func (m *Machine) confinement() func(writes []string) error {
	if !m.cfg.Confine {
		return nil
	}
	// /dev/null discards what it is given: nothing to keep from QEMU, which may use it, as its libraries may.
	writable := []string{os.DevNull}
	for _, f := range openedByPath(m.cfg) {
		if f.mode&mayWrite != 0 {
			writable = append(writable, f.path)
		}
	}
	return func(writes []string) error {
		abi, err := confine.Policy{Writable: append(writable, writes...)}.Thread()
		if err == nil && abi == 0 {
			m.log.Warn("QEMU may write the host's files its user may: the host kernel has no Landlock (hypervisor.confine; its sockets are filtered all the same)")
		}
		return err
	}
}

// checkReachable fails unless cred may open each file QEMU opens by path (openedByPath). It reads mode bits only
// (no ACLs), along the whole path.
func checkReachable(c Config, cred *syscall.Credential) error {
	if cred == nil {
		return nil
	}
	files := openedByPath(c)
	for _, f := range files {
		if err := reachable(f.path, cred, f.mode); err != nil {
			return fmt.Errorf("%s %s: QEMU runs as uid %d gid %d and %w (make it readable, or change hypervisor.user)", f.what, f.path, cred.Uid, cred.Gid, err)
		}
	}
	return nil
}

// reachable says whether cred may search every directory above p and access p itself with mode.
func reachable(p string, cred *syscall.Credential, mode uint32) error {
	p = filepath.Clean(p)
	for dir := filepath.Dir(p); ; dir = filepath.Dir(dir) {
		if err := permits(dir, cred, mayExec); err != nil {
			return err
		}
		if dir == "/" || dir == "." {
			break
		}
	}
	return permits(p, cred, mode)
}

func permits(p string, cred *syscall.Credential, mode uint32) error {
	fi, err := os.Stat(p)
	if err != nil {
		return err
	}
	st := fi.Sys().(*syscall.Stat_t)
	perm := uint32(fi.Mode().Perm())
	var bits uint32
	switch {
	case st.Uid == cred.Uid:
		bits = perm >> 6
	case st.Gid == cred.Gid || slices.Contains(cred.Groups, st.Gid):
		bits = perm >> 3
	default:
		bits = perm
	}
	if bits&mode != mode {
		return errors.New("cannot " + modeWord(mode) + " " + p)
	}
	return nil
}

func modeWord(mode uint32) string {
	switch mode {
	case mayExec:
		return "search"
	case mayRead:
		return "read"
	default:
		return "open for reading and writing"
	}
}

// CheckReadable fails unless uid and gid may read the guest kernel and initrd, and with hardware KVM (acc) open
// /dev/kvm, as a VM's start checks (for `kiln check`).
func CheckReadable(a config.Assets, acc accel.Kind, uid, gid uint32) error {
	c := Config{Kernel: a.Kernel, Initrd: a.Initrd, Accel: acc, User: &syscall.Credential{Uid: uid, Gid: gid}}
	return checkReachable(c, qemuCredential(c))
}
