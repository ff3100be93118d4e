package pod

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/kiln-runtime/kiln/runtime/network"
	"github.com/kiln-runtime/kiln/runtime/share"
	"github.com/kiln-runtime/kiln/vm/qemu"
)

// sweep removes the VM state and shares of pods whose owner is gone (killed before it could clean up; its
// QEMU died with it through the parent-death signal). A share another process is removing (a dead shim's
// `delete`, another pod's sweep) is left to it.
func sweep(stateDir string, log *logrus.Entry) {
	if _, err := qemu.Sweep(stateDir); err != nil {
		log.WithError(err).Warn("sweep state of VMs whose owner is gone")
	}
	shares, _ := filepath.Glob(ShareDir(stateDir, "*"))
	for _, dir := range shares {
		pid, err := qemu.ReadOwner(filepath.Join(dir, ownerFile))
		if err != nil || qemu.OwnerAlive(pid) {
			continue
		}
		if err := RemoveShare(dir, false); err != nil {
			log.WithError(err).WithField("share", dir).Warn("remove share whose owner is gone")
		}
	}
	// A spare killed while it warmed its pod left the warm-up's bundle (Warm); its pod's share is gone by now.
	warm, _ := filepath.Glob(filepath.Join(stateDir, "*"+warmSuffix+"*"))
	for _, dir := range warm {
		id, _, _ := strings.Cut(filepath.Base(dir), warmSuffix)
		if _, err := os.Lstat(ShareDir(stateDir, id)); !errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err := os.RemoveAll(dir); err != nil {
			log.WithError(err).WithField("dir", dir).Warn("remove the warm-up bundle of a pod that is gone")
		}
	}
}

// RemoveShare removes the share dir of a pod whose owner is gone, having undone first what the pod's network
// mirror left in the pod's network namespace (network.Unmirror, from MirrorFile). A dead shim's `delete` and a
// new pod's sweep can come to the same share at once; the lock on the share directory lets one of them remove
// it. wait says whether to wait for another holder of the lock (`delete`, which reports the pod cleaned up) or
// to leave the share to it (a sweep). A share that is gone is not an error.
func RemoveShare(dir string, wait bool) error {
	f, err := os.Open(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("remove share %s: %w", dir, err)
	}
	defer f.Close()
	how := unix.LOCK_EX
	if !wait {
		how |= unix.LOCK_NB
	}
	if err := unix.Flock(int(f.Fd()), how); err != nil {
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil
		}
		return fmt.Errorf("lock share %s: %w", dir, err)
	}
	// Whoever held the lock before removed it.
	if _, err := os.Lstat(dir); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	var errs []error
	if err := network.Unmirror(filepath.Join(dir, MirrorFile)); err != nil {
		errs = append(errs, err)
	}
	if err := share.Remove(dir); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}
