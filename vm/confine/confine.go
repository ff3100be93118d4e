// Package confine keeps a program Kiln starts for a VM (QEMU) from changing the host's file system and from
// reaching the host's network beyond the few files it is given, should a guest take the program over: a Landlock
// domain on the thread that forks it, which the program inherits from its fork on and can never leave. Reading
// is left alone (the program's own uid and its seccomp sandbox bound it). What is restricted grows with the
// kernel's Landlock ABI: writing, making, removing and renaming files (ABI 1, Linux 5.13; 2 adds renames across
// directories), truncating them (3, 6.2), binding and connecting TCP sockets (4, 6.7), device ioctls (5, 6.10),
// abstract UNIX sockets and signals that lead outside the domain (6, 6.12), and, where the kernel has them, UDP
// and pathname UNIX sockets. Where the kernel has no Landlock nothing is restricted, and Thread says so.
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

// ABI is the kernel's Landlock ABI version, 0 where it has none (not built, or not enabled at boot: lsm=).
func ABI() int {
	v, err := ll.LandlockGetABIVersion()
	if err != nil {
		return 0
	}
	return v
}

// Thread restricts the calling thread by p, for good, and returns the kernel's ABI version it enforced, 0 where
// the kernel has no Landlock (then nothing is restricted and the error is nil). The caller holds
// runtime.LockOSThread and never unlocks it, so that the thread ends with its goroutine instead of serving
// another. It sets no_new_privs on the thread too, which Landlock needs of a thread without CAP_SYS_ADMIN (QEMU's
// sandbox sets it anyway).
func (p Policy) Thread() (int, error) {
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
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		return 0, fmt.Errorf("set no_new_privs: %w", err)
	}
	if err := ll.LandlockRestrictSelf(fd, flags); err != nil {
		return 0, fmt.Errorf("landlock_restrict_self: %w", err)
	}
	return ABI(), nil
}
