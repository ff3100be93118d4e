package container

import (
	"fmt"
	"os"
	"slices"
	"strings"

	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// fitDevices fits the spec's devices to the guest. A device names its node by type and numbers, which the guest
// reads as its own devices: host devices are not passed through. One the guest has (has) stays; one it lacks is
// refused, naming it, unless the container may use every device (a privileged one's cgroup rule allows all: its
// runtime listed every device of the host), where it is left out and returned, for the log.
func fitDevices(l *specs.Linux, has func(typ string, major, minor int64) bool) (dropped []string, err error) {
	if l == nil || len(l.Devices) == 0 {
		return nil, nil
	}
	all := l.Resources != nil && slices.ContainsFunc(l.Resources.Devices, func(r specs.LinuxDeviceCgroup) bool {
		return r.Allow && (r.Type == "" || r.Type == "a") && r.Major == nil && r.Minor == nil && strings.Contains(r.Access, "rwm")
	})
	kept := l.Devices[:0:0]
	for i, d := range l.Devices {
		if d.Type == "p" || has(d.Type, d.Major, d.Minor) {
			kept = append(kept, d)
			continue
		}
		name := fmt.Sprintf("%s (%s %d:%d)", d.Path, d.Type, d.Major, d.Minor)
		if !all {
			return nil, fmt.Errorf("linux.devices[%d] %s: the VM has no such device; a Kiln container gets the devices of its VM's kernel, not the host's: remove it from the spec, or use runc for it", i, name)
		}
		dropped = append(dropped, name)
	}
	l.Devices = kept
	return dropped, nil
}

// guestHasDevice says whether the guest's kernel has the device of type typ ("c", "u" or "b") and numbers.
func guestHasDevice(typ string, major, minor int64) bool {
	class := "char"
	if typ == "b" {
		class = "block"
	}
	_, err := os.Stat(fmt.Sprintf("/sys/dev/%s/%d:%d", class, major, minor))
	return err == nil
}
