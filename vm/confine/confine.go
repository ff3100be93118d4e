// Package confine keeps a program Kiln starts for a VM (QEMU) from changing the host's file system and from
// reaching the host's network beyond the few files it is given, should a guest take the program over: a Landlock
// domain and a seccomp filter on the thread that forks it, which the program inherits from its fork on and can
// never leave. Reading is left alone (the program's own uid and its own seccomp sandbox bound it).
//
// The seccomp filter refuses every socket but UNIX and netlink ones (so TCP, UDP and Multipath TCP alike, vsock,
// packet sockets) and io_uring, on every kernel. What Landlock restricts grows with the kernel's ABI: writing,
// making, removing and renaming files (ABI 1, Linux 5.13), truncating them (3, 6.2), binding and connecting TCP
// sockets (4, 6.7), device ioctls (5, 6.10), abstract UNIX sockets and signals that lead outside the domain (6,
// 6.12), pathname UNIX sockets (9) and UDP (10). Where the kernel has no Landlock, only the filter applies, and
// Thread says so.
package confine

import (
	"fmt"

	"github.com/landlock-lsm/go-landlock/landlock"
	ll "github.com/landlock-lsm/go-landlock/landlock/syscall"
	"golang.org/x/sys/unix"
)

// Policy is what a confined program may still change.
type Policy struct {
	// Writable are files the program may open for writing, truncate and use device ioctls on (a guest-RAM file,
	// /dev/kvm). Each must exist.
	Writable []string
}

// readAccess is what the domain leaves to the program's uid: reading files and directories, and executing.
const readAccess = landlock.AccessFSSet(ll.AccessFSExecute | ll.AccessFSReadFile | ll.AccessFSReadDir)

// writableAccess is what Policy.Writable grants.
const writableAccess = landlock.AccessFSSet(ll.AccessFSWriteFile | ll.AccessFSTruncate | ll.AccessFSIoctlDev)

// config restricts all the rest the library knows, and takes from that what the kernel can enforce. Denials are
// logged for the program as well as for Kiln's thread (the kernel's audit log, ABI 7).
func config() landlock.Config {
	return landlock.Config{
		HandledAccessFS:  landlock.V11.HandledAccessFS &^ readAccess,
		HandledAccessNet: landlock.V11.HandledAccessNet,
		Scoped:           landlock.V11.Scoped,
	}.BestEffort().EnableLoggingForSubprocesses()
}

// reach is what the domain restricts from each Landlock ABI version on.
var reach = []struct {
	abi  int
	what string
}{{1, "file writes"}, {3, "truncation"}, {4, "TCP"}, {5, "device ioctls"}, {6, "abstract UNIX sockets and signals"}, {9, "UNIX socket paths"}, {10, "UDP"}}

// Restricts names what a Landlock domain restricts on a kernel of Landlock ABI version abi, in the order the
// versions added them; none for 0.
func Restricts(abi int) []string {
	var what []string
	for _, r := range reach {
		if abi >= r.abi {
			what = append(what, r.what)
		}
	}
	return what
}

// ABI is the kernel's Landlock ABI version, 0 where it has none (not built, or not enabled at boot: lsm=).
func ABI() int {
	v, err := ll.LandlockGetABIVersion()
	if err != nil {
		return 0
	}
	return v
}

// Thread restricts the calling thread by p, for good, and returns the kernel's Landlock ABI version, 0 where it
// has none (then only the socket filter applies, and the error is nil). The caller holds runtime.LockOSThread and
// never unlocks it, so that the thread ends with its goroutine instead of serving another (Go parks the process's
// main thread instead: nothing else runs on it either). A thread without CAP_SYS_ADMIN also gets no_new_privs,
// which both need of it; one with it does not, so that the program's exec keeps its LSM's transitions.
func (p Policy) Thread() (int, error) {
	if !sysAdmin() {
		if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
			return 0, fmt.Errorf("set no_new_privs: %w", err)
		}
	}
	abi, err := p.landlock()
	if err != nil {
		return 0, err
	}
	if err := filterSockets(); err != nil {
		return 0, err
	}
	return abi, nil
}

// landlock restricts the calling thread with a Landlock domain.
func (p Policy) landlock() (int, error) {
	var rules []landlock.Rule
	if len(p.Writable) > 0 {
		rules = append(rules, landlock.PathAccess(writableAccess, p.Writable...))
	}
	fd, flags, err := config().NewRulesetFD(rules...)
	if err != nil {
		return 0, fmt.Errorf("landlock ruleset: %w", err)
	}
	if fd < 0 {
		return 0, nil
	}
	defer unix.Close(fd)
	if err := ll.LandlockRestrictSelf(fd, flags); err != nil {
		return 0, fmt.Errorf("landlock_restrict_self: %w", err)
	}
	return ABI(), nil
}

// sysAdmin reports whether the calling thread has CAP_SYS_ADMIN in its effective set.
func sysAdmin() bool {
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return false
	}
	return data[unix.CAP_SYS_ADMIN/32].Effective&(1<<(unix.CAP_SYS_ADMIN%32)) != 0
}
