package agent

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
)

// fromImageEnv, set to "1", tells the agent that it was re-executed from the agent image by runFromImage: the
// guest is already out of the initramfs, and the initramfs's copy of the binary is left to remove.
const fromImageEnv = "KILN_AGENT_FROM_IMAGE"

// agentImageDevice is the agent image's block device, the guest's only virtio-pmem device.
const agentImageDevice = "pmem0"

// virtioPmemDriver is the virtio-pmem driver in sysfs, which a kernel built with it registers before /init.
const virtioPmemDriver = "/sys/bus/virtio/drivers/virtio_pmem"

// Bounds of the wait for agentImageDevice. libnvdimm registers its devices asynchronously, and the kernel does
// not wait for them before it starts /init.
const (
	agentImageWaitTimeout  = 5 * time.Second
	agentImageWaitInterval = 2 * time.Millisecond
)

// fromImage reports whether this agent was re-executed from the agent image, and takes the marker out of its
// environment, so that nothing the agent starts inherits it.
func fromImage() bool {
	on := os.Getenv(fromImageEnv) == "1"
	os.Unsetenv(fromImageEnv)
	return on
}

// runFromImage mounts the agent image (agentv1.CmdlineAgentImage) read-only with DAX at
// agentv1.GuestAgentImageDir and re-executes the agent from it. It returns only when it could not, saying why;
// the agent then goes on from the initramfs, which costs memory and nothing else. The image's binary must be
// this agent's own, byte for byte: an image from another build would run a different agent in every clone. It
// runs before the agent starts anything, with /proc, /sys and /run mounted but not /dev.
func runFromImage(log *logrus.Entry) error {
	start := time.Now()
	// A kernel without the driver would have the agent wait for a device that never comes.
	if _, err := os.Stat(virtioPmemDriver); err != nil {
		return fmt.Errorf("agent image: the guest kernel has no virtio-pmem driver (VIRTIO_PMEM): %w", err)
	}
	devNum, err := waitBlockDevice(agentImageDevice, agentImageWaitTimeout, agentImageWaitInterval)
	if err != nil {
		return err
	}
	// The device node lives in the initramfs for as long as the mount takes: /dev is not mounted yet, and /run
	// is nodev.
	node := "/.kiln-" + agentImageDevice
	if err := unix.Mknod(node, unix.S_IFBLK|0o600, int(devNum)); err != nil {
		return fmt.Errorf("create the agent image's device node %s: %w", node, err)
	}
	defer os.Remove(node)
	dir := agentv1.GuestAgentImageDir
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("create the agent image's mount point: %w", err)
	}
	if err := unix.Mount(node, dir, "ext2", unix.MS_RDONLY|unix.MS_NOSUID|unix.MS_NODEV, "dax"); err != nil {
		return fmt.Errorf("mount the agent image (%s) on %s: %w", agentImageDevice, dir, err)
	}
	// The mount holds the device; the node goes now, since a successful exec runs no deferred call.
	if err := os.Remove(node); err != nil {
		log.WithError(err).Warn("remove the agent image's device node")
	}
	bin := filepath.Join(dir, agentv1.AgentImageBinary)
	if err := checkImageBinary(bin); err != nil {
		if uerr := unix.Unmount(dir, 0); uerr != nil {
			err = errors.Join(err, fmt.Errorf("unmount the agent image: %w", uerr))
		}
		return err
	}
	log.WithField("took", time.Since(start)).Debug("agent image mounted; re-executing the agent from it")
	env := append(os.Environ(), fromImageEnv+"=1")
	return fmt.Errorf("run the agent from its image: %w", unix.Exec(bin, os.Args, env))
}

// checkImageBinary checks that bin, the agent image's binary, is mapped with DAX (else the guest's page cache
// would hold it as the initramfs does) and is the running agent's own binary.
func checkImageBinary(bin string) error {
	var stx unix.Statx_t
	if err := unix.Statx(unix.AT_FDCWD, bin, 0, unix.STATX_BASIC_STATS, &stx); err != nil {
		return fmt.Errorf("agent image: %w", err)
	}
	if stx.Attributes_mask&unix.STATX_ATTR_DAX == 0 || stx.Attributes&unix.STATX_ATTR_DAX == 0 {
		return fmt.Errorf("agent image: %s is not mapped with DAX", bin)
	}
	same, err := sameContent(bin, "/proc/self/exe")
	if err != nil {
		return fmt.Errorf("agent image: %w", err)
	}
	if !same {
		return fmt.Errorf("agent image: %s is not this agent's binary (the image comes from another build)", bin)
	}
	return nil
}

// waitBlockDevice waits for the block device name to appear in sysfs and returns its device number.
func waitBlockDevice(name string, timeout, interval time.Duration) (uint64, error) {
	path := filepath.Join("/sys/block", name, "dev")
	deadline := time.Now().Add(timeout)
	for {
		b, err := os.ReadFile(path)
		if err == nil {
			return parseDevNumber(string(b))
		}
		if !errors.Is(err, os.ErrNotExist) {
			return 0, fmt.Errorf("find block device %s: %w", name, err)
		}
		if time.Now().After(deadline) {
			return 0, fmt.Errorf("block device %s did not appear within %v", name, timeout)
		}
		time.Sleep(interval)
	}
}

// parseDevNumber parses sysfs's "major:minor" form of a device number.
func parseDevNumber(s string) (uint64, error) {
	maj, min, ok := strings.Cut(strings.TrimSpace(s), ":")
	if !ok {
		return 0, fmt.Errorf("parse device number %q: want major:minor", s)
	}
	ma, err := strconv.ParseUint(maj, 10, 32)
	if err != nil {
		return 0, fmt.Errorf("parse device number %q: %w", s, err)
	}
	mi, err := strconv.ParseUint(min, 10, 32)
	if err != nil {
		return 0, fmt.Errorf("parse device number %q: %w", s, err)
	}
	return unix.Mkdev(uint32(ma), uint32(mi)), nil
}

// sameContent reports whether the files a and b hold the same bytes.
func sameContent(a, b string) (bool, error) {
	fa, err := os.Open(a)
	if err != nil {
		return false, err
	}
	defer fa.Close()
	fb, err := os.Open(b)
	if err != nil {
		return false, err
	}
	defer fb.Close()
	sa, err := fa.Stat()
	if err != nil {
		return false, err
	}
	sb, err := fb.Stat()
	if err != nil {
		return false, err
	}
	if sa.Size() != sb.Size() {
		return false, nil
	}
	const chunk = 1 << 20
	ba, bb := make([]byte, chunk), make([]byte, chunk)
	for {
		na, erra := io.ReadFull(fa, ba)
		nb, errb := io.ReadFull(fb, bb)
		if !bytes.Equal(ba[:na], bb[:nb]) {
			return false, nil
		}
		switch {
		case errors.Is(erra, io.EOF) || errors.Is(erra, io.ErrUnexpectedEOF):
			return errors.Is(errb, io.EOF) || errors.Is(errb, io.ErrUnexpectedEOF), nil
		case erra != nil:
			return false, fmt.Errorf("read %s: %w", a, erra)
		case errb != nil:
			return false, fmt.Errorf("read %s: %w", b, errb)
		}
	}
}

// hasAgentImageDevice reports whether the agent image's block device exists, whether or not the agent runs from
// it.
func hasAgentImageDevice() bool {
	_, err := os.Stat(filepath.Join("/sys/block", agentImageDevice))
	return err == nil
}
