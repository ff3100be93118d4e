// Package rlimit names Linux's resource limits as OCI does, and gives a container's processes the limits a
// process runc starts would have: the shim's own, which are containerd's, for every limit its OCI spec leaves out
// (CRI leaves them all out). Without them a container's processes would start with the guest kernel's limits for
// its first process (1024 open files, at most 4096; processes by guest RAM).
package rlimit

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os/exec"
	"slices"
	"strconv"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

// kinds are Linux's resource limits: OCI's name and the kernel's number.
var kinds = [...]struct {
	name     string
	resource int
}{
	{"RLIMIT_AS", unix.RLIMIT_AS},
	{"RLIMIT_CORE", unix.RLIMIT_CORE},
	{"RLIMIT_CPU", unix.RLIMIT_CPU},
	{"RLIMIT_DATA", unix.RLIMIT_DATA},
	{"RLIMIT_FSIZE", unix.RLIMIT_FSIZE},
	{"RLIMIT_LOCKS", unix.RLIMIT_LOCKS},
	{"RLIMIT_MEMLOCK", unix.RLIMIT_MEMLOCK},
	{"RLIMIT_MSGQUEUE", unix.RLIMIT_MSGQUEUE},
	{"RLIMIT_NICE", unix.RLIMIT_NICE},
	{"RLIMIT_NOFILE", unix.RLIMIT_NOFILE},
	{"RLIMIT_NPROC", unix.RLIMIT_NPROC},
	{"RLIMIT_RSS", unix.RLIMIT_RSS},
	{"RLIMIT_RTPRIO", unix.RLIMIT_RTPRIO},
	{"RLIMIT_RTTIME", unix.RLIMIT_RTTIME},
	{"RLIMIT_SIGPENDING", unix.RLIMIT_SIGPENDING},
	{"RLIMIT_STACK", unix.RLIMIT_STACK},
}

// Number is the kernel's number of the limit OCI names name; false for a name Linux has no limit of.
func Number(name string) (int, bool) {
	for _, k := range kinds {
		if k.name == name {
			return k.resource, true
		}
	}
	return 0, false
}

// Inherited are the limits this process's children start with: its own, but for open files the soft limit it
// started with. Go raises that one to one below the hard limit as a program starts (package syscall's init) and
// gives the original back to each child it starts, which is how runc's container gets containerd's; a child asked
// says what it was given. The limits are usable whatever the error, which tells what could not be read: a limit
// that cannot be read is left out, a child that cannot be asked leaves the soft limit on open files as it is now.
func Inherited(ctx context.Context) ([]specs.POSIXRlimit, error) {
	limits := make([]specs.POSIXRlimit, 0, len(kinds))
	var errs []error
	for _, k := range kinds {
		var l unix.Rlimit
		if err := unix.Getrlimit(k.resource, &l); err != nil {
			errs = append(errs, fmt.Errorf("read %s: %w", k.name, err))
			continue
		}
		if k.resource == unix.RLIMIT_NOFILE && l.Max != unix.RLIM_INFINITY && l.Cur == l.Max-1 {
			if soft, err := childsOpenFiles(ctx); err != nil {
				errs = append(errs, err)
			} else {
				l.Cur = min(soft, l.Max)
			}
		}
		limits = append(limits, specs.POSIXRlimit{Type: k.name, Soft: l.Cur, Hard: l.Max})
	}
	return limits, errors.Join(errs...)
}

// childsOpenFiles is the soft limit on open files a child of this process starts with.
func childsOpenFiles(ctx context.Context) (uint64, error) {
	out, err := exec.CommandContext(ctx, "/bin/sh", "-c", "ulimit -S -n").Output()
	if err != nil {
		return 0, fmt.Errorf("ask a child for its limit on open files: %w", err)
	}
	s := string(bytes.TrimSpace(out))
	if s == "unlimited" {
		return unix.RLIM_INFINITY, nil
	}
	n, err := strconv.ParseUint(s, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("a child's limit on open files: %q: %w", s, err)
	}
	return n, nil
}

// Fill returns a copy of p given each of the inherited limits p does not name, as runc's process would inherit
// them; p is left as it is. Nil for a nil p.
func Fill(p *specs.Process, inherited []specs.POSIXRlimit) *specs.Process {
	if p == nil {
		return nil
	}
	filled := *p
	filled.Rlimits = slices.Clone(p.Rlimits)
	for _, l := range inherited {
		if !slices.ContainsFunc(p.Rlimits, func(named specs.POSIXRlimit) bool { return named.Type == l.Type }) {
			filled.Rlimits = append(filled.Rlimits, l)
		}
	}
	return &filled
}
