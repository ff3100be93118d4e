package config

import (
	"fmt"
	"os/user"
	"strconv"
	"strings"
)

// DefaultQEMUUser is hypervisor.user's default: nobody and nogroup on Debian.
const DefaultQEMUUser = "65534:65534"

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

// QEMUUser is hypervisor.user resolved to ids.
type QEMUUser struct {
	UID, GID uint32
}

// ResolveUser resolves hypervisor.user: "uid:gid", "uid" (the gid is the user's primary group, or the same
// number without a passwd entry), "name" or "name:group". ok is false when the key is empty: QEMU then runs
// as Kiln's own user.
func (h Hypervisor) ResolveUser() (u QEMUUser, ok bool, err error) {
	s := strings.TrimSpace(h.User)
	if s == "" {
		return QEMUUser{}, false, nil
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
