package container

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// fitDevices fits the spec's devices to the guest. A device names its node by type and numbers, which the guest
// reads as its own devices: host devices are not passed through. One the guest has (guest says which device, if
// any, has those numbers) stays, one numbered on arrival (numberedOnArrival) only under the same name; one it
// lacks, or one numbered on arrival it has under another name, is refused, naming it, unless the container may
// use every device (a privileged one's cgroup rule allows all: its runtime listed every device of the host),
// where it is left out and returned, for the log. Such numbers name different devices on the host and in the
// guest: the host's first NVMe disk (block 259:0) is a template clone's first virtio-pmem device, the agent's
// image, which a container must not get in its place. Character devices of fixed numbers (the memory devices,
// /dev/fuse, /dev/net/tun) may be given another name in the container (--device /dev/fuse:/dev/myfuse). A
// device named outside /dev is taken by its numbers alone.
func fitDevices(l *specs.Linux, guest func(typ string, major, minor int64) (name string, ok bool)) (dropped []string, err error) {
	if l == nil || len(l.Devices) == 0 {
		return nil, nil
	}
	all := l.Resources != nil && slices.ContainsFunc(l.Resources.Devices, func(r specs.LinuxDeviceCgroup) bool {
		return r.Allow && (r.Type == "" || r.Type == "a") && r.Major == nil && r.Minor == nil && strings.Contains(r.Access, "rwm")
	})
	kept := l.Devices[:0:0]
	for i, d := range l.Devices {
		if d.Type == "p" {
			kept = append(kept, d)
			continue
		}
		name := fmt.Sprintf("%s (%s %d:%d)", d.Path, d.Type, d.Major, d.Minor)
		var why string
		switch got, ok := guest(d.Type, d.Major, d.Minor); {
		case !ok:
			why = "the VM has no such device"
		case numberedOnArrival(d.Type, d.Major) && got != "" && !sameDevice(d.Path, got):
			why = fmt.Sprintf("the VM's device with those numbers is /dev/%s, another device", got)
		default:
			kept = append(kept, d)
			continue
		}
		if !all {
			return nil, fmt.Errorf("linux.devices[%d] %s: %s; a Kiln container gets the devices of its VM's kernel, not the host's: remove it from the spec, or use runc for it", i, name, why)
		}
		dropped = append(dropped, name)
	}
	l.Devices = kept
	return dropped, nil
}

// numberedOnArrival says whether a device of type typ and major number gets its numbers as devices appear rather
// than by Linux's list of fixed numbers: every block device (disks, partitions and device-mapper targets take
// the next free numbers), and character devices of the dynamic majors, 234 to 254 and 384 to 511 (hidraw, rtc,
// ptp, virtio consoles, GPU drivers' devices).
func numberedOnArrival(typ string, major int64) bool {
	return typ == "b" || major >= 234 && major <= 254 || major >= 384 && major <= 511
}

// sameDevice says whether a spec's device path names the guest device devName (its name under /dev, as the
// kernel gives it: "null", "net/tun"). A path outside /dev names no device by its name.
func sameDevice(path, devName string) bool {
	rel, ok := strings.CutPrefix(filepath.Clean(path), "/dev/")
	return !ok || rel == devName
}

// guestDevice says whether the guest's kernel has a device of type typ ("c", "u" or "b") and numbers, and its name
// under /dev (the DEVNAME of its uevent; empty when the kernel gives none).
func guestDevice(typ string, major, minor int64) (string, bool) {
	class := "char"
	if typ == "b" {
		class = "block"
	}
	dir := fmt.Sprintf("/sys/dev/%s/%d:%d", class, major, minor)
	if _, err := os.Stat(dir); err != nil {
		return "", false
	}
	b, err := os.ReadFile(filepath.Join(dir, "uevent"))
	if err != nil {
		return "", true
	}
	for _, line := range strings.Split(string(b), "\n") {
		if name, ok := strings.CutPrefix(line, "DEVNAME="); ok {
			return name, true
		}
	}
	return "", true
}
