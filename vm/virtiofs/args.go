package virtiofs

import (
	"fmt"
	"strconv"
)

// listenFD is the descriptor number the vhost-user listening socket has in virtiofsd: the first of
// exec.Cmd.ExtraFiles.
const listenFD = 3

// xattrMap is the extended attributes a guest may read and write (virtiofsd's xattrmap rules, in order, the last
// refusing everything else).
const xattrMap = ":ok:all:security.capability::" + ":ok:all:user.::" + ":bad:all:::"

// args builds virtiofsd's command line. It is a pure function of the configuration so it can be tested
// without virtiofsd.
func args(c Config) []string {
	a := []string{
		// Kiln owns the listening socket and passes it in: the socket exists before virtiofsd runs, so QEMU can
		// never race its creation, and virtiofsd skips the pid file it would otherwise leave in
		// /var/run/virtiofsd when it is killed.
		"--fd=" + strconv.Itoa(listenFD),
		"-o", "source=" + c.SourceDir,
	}
	if c.Cache == CacheAuto {
		// virtiofsd's "auto" differs from its "always" in two ways: files and directories are opened without
		// FOPEN_KEEP_CACHE and FOPEN_CACHE_DIR, so the guest drops a file's cached data at every open, and
		// metadata is trusted for 1 s instead of a day. The first made every exec in a container read the
		// binary through virtio-fs again and, under TCG, translate all of its code again (about 3,500 blocks
		// for each `busybox true` in a shell loop). "always" with auto's timeout keeps the cache across opens;
		// the guest kernel (FUSE_AUTO_INVAL_DATA, on by default) drops it when a revalidation finds the size or
		// the modification time changed.
		a = append(a, "-o", "cache="+string(CacheAlways), "-o", "timeout=1")
	} else {
		a = append(a, "-o", "cache="+string(c.Cache))
	}
	a = append(a,
		// The namespace sandbox pivots into the source inside a new mount namespace whose mounts are slaves of
		// the host's, so mounts made under the source after start still reach the guest.
		"-o", "sandbox=namespace",
		// Without it the guest would see files of different host file systems under one device number, and
		// inode numbers could collide; with it each host mount becomes a submount in the guest.
		"-o", "announce_submounts",
		// virtiofsd runs as root: with CAP_MKNOD a guest's root could make device nodes in a writable export
		// (a host volume) that any host user who reaches it could open, the host's disks included. FIFOs and
		// sockets need no capability.
		"-o", "modcaps=-mknod",
		"-o", "log_level="+c.LogLevel,
	)
	if c.Xattr {
		// File capabilities (security.capability) and user.* attributes pass through, as runc's containers
		// see them; every other name is refused. virtiofsd sets attributes as root, so trusted.* (which the
		// host's overlayfs trusts), security.selinux and the like would give the guest what a runc container
		// without CAP_SYS_ADMIN on the host cannot do.
		a = append(a, "-o", "xattrmap="+xattrMap,
			// The server clears set-id bits and file capabilities on a write, as the host's kernel does for
			// virtiofsd's: without it the guest's kernel asks for security.capability before every write (FUSE
			// keeps no memory of a file without one).
			"-o", "killpriv_v2")
	} else {
		a = append(a, "-o", "no_xattr")
	}
	if c.ThreadPoolSize > 0 {
		a = append(a, fmt.Sprintf("--thread-pool-size=%d", c.ThreadPoolSize))
	}
	return append(a, c.ExtraArgs...)
}
