package config

import (
	"fmt"
	"os/user"
	"strconv"
	"strings"
)

// QEMUUserPerVM is hypervisor.user's default: each VM's QEMU runs as a uid and gid of its own from
// hypervisor.user_range.
const QEMUUserPerVM = "per-vm"

// DefaultQEMUUserRange is hypervisor.user_range's default: 65536 ids from 0x70000000, in the span systemd leaves to
// no one (1879048192 to 2147352575: above the ranges it gives containers' user namespaces and below its own
// "foreign" range), so that no account of the host and no container mapped by systemd shares one.
const DefaultQEMUUserRange = "1879048192:65536"

// DefaultMemoryOverheadMiB is hypervisor.memory_overhead_mib's default: what QEMU and virtiofsd may use beyond
// guest RAM before the VM's cgroup refuses them memory. It covers QEMU's own heap, libraries and thread stacks
// (about 40 MiB), TCG's translation cache (DefaultTCGTranslationCacheMiB), virtiofsd (a few MiB), and page cache
// the host charges to the cgroup for files the guest reads through virtio-fs (reclaimable, so it shrinks before
// anything is killed).
const DefaultMemoryOverheadMiB = 256

// DefaultTCGTranslationCacheMiB is hypervisor.tcg_translation_cache_mib's default. A container's start (the
// boot, the agent, runc's init, the container's program) translates more code than 32 or 64 MiB hold: the cache
// fills, QEMU flushes it and translates everything again, which made `ctr run --rm` about 0.3 to 0.6 s slower on
// the test machine. 128 MiB holds it; QEMU's own default reserves 1 GiB, and only what is translated is resident.
const DefaultTCGTranslationCacheMiB = 128

// QEMUUser is hypervisor.user resolved to ids: one user for every VM's QEMU, or (Range.Count set) a range each
// VM's QEMU takes a uid of its own from, with the gid of the same number.
type QEMUUser struct {
	UID, GID uint32
	Range    IDRange
}

// IDRange is a span of host ids: Count of them from First.
type IDRange struct {
	First, Count uint32
}

// ResolveUser resolves hypervisor.user: "per-vm" (hypervisor.user_range), "uid:gid", "uid" (the gid is the user's
// primary group, or the same number without a passwd entry), "name" or "name:group". ok is false when the key is
// empty: QEMU then runs as Kiln's own user.
func (h Hypervisor) ResolveUser() (u QEMUUser, ok bool, err error) {
	s := strings.TrimSpace(h.User)
	if s == "" {
		return QEMUUser{}, false, nil
	}
	if s == QEMUUserPerVM {
		r, err := parseIDRange(h.UserRange)
		if err != nil {
			return QEMUUser{}, false, err
		}
		return QEMUUser{Range: r}, true, nil
	}
	name, group, hasGroup := strings.Cut(s, ":")
	uid, err := strconv.ParseUint(name, 10, 32)
	var primary string
	if err != nil {
		pw, lerr := user.Lookup(name)
		if lerr != nil {
			return QEMUUser{}, false, fmt.Errorf("hypervisor.user = %q: %w", h.User, lerr)
		}
		uid, _ = strconv.ParseUint(pw.Uid, 10, 32)
		primary = pw.Gid
	} else if pw, lerr := user.LookupId(name); lerr == nil {
		primary = pw.Gid
	} else {
		primary = name
	}
	if !hasGroup {
		group = primary
	}
	gid, err := strconv.ParseUint(group, 10, 32)
	if err != nil {
		gr, lerr := user.LookupGroup(group)
		if lerr != nil {
			return QEMUUser{}, false, fmt.Errorf("hypervisor.user = %q: %w", h.User, lerr)
		}
		gid, _ = strconv.ParseUint(gr.Gid, 10, 32)
	}
	if uid == 0 {
		return QEMUUser{}, false, fmt.Errorf("hypervisor.user = %q: QEMU must not run as root; leave the key empty to run it as Kiln's own user", h.User)
	}
	return QEMUUser{UID: uint32(uid), GID: uint32(gid)}, true, nil
}

// parseIDRange reads hypervisor.user_range, "first:count" as /etc/subuid writes a range.
func parseIDRange(s string) (IDRange, error) {
	bad := func(why string) (IDRange, error) {
		return IDRange{}, fmt.Errorf("hypervisor.user_range = %q: %s (hypervisor.user = %q takes each VM's QEMU a uid from it; the default is %q)", s, why, QEMUUserPerVM, DefaultQEMUUserRange)
	}
	first, count, ok := strings.Cut(strings.TrimSpace(s), ":")
	if !ok {
		return bad("want \"first:count\"")
	}
	f, err := strconv.ParseUint(first, 10, 32)
	if err != nil {
		return bad("the first id is not a number below 2^32")
	}
	n, err := strconv.ParseUint(count, 10, 32)
	if err != nil || n == 0 {
		return bad("the count is not a positive number")
	}
	switch {
	case f == 0:
		return bad("the range holds root's id 0")
	case f+n-1 >= 1<<32-1:
		// 2^32-1 is (uid_t)-1, which no process can run as.
		return bad("the range reaches 4294967295, which is no id")
	case f < 1<<16:
		// System accounts, people, systemd's dynamic users and nobody.
		return bad("the range starts below 65536, among the ids of the host's accounts")
	}
	return IDRange{First: uint32(f), Count: uint32(n)}, nil
}
