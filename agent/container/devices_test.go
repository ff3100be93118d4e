package container

import (
	"reflect"
	"strings"
	"testing"

	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// A device the guest has stays, one numbered on arrival (a block device, a dynamic character major) only under
// its name; one it lacks, or one numbered on arrival it has under another name, is refused naming it, or left
// out for a container allowed every device (privileged: its runtime listed all of the host's).
func TestFitDevices(t *testing.T) {
	guest := func(typ string, major, minor int64) (string, bool) {
		switch {
		case typ == "c" && major == 10 && minor == 229:
			return "fuse", true
		case typ == "b" && major == 259 && minor == 0:
			return "pmem0", true
		case typ == "c" && major == 4 && minor == 64:
			return "", true // a device whose uevent names none
		case typ == "c" && major == 252 && minor == 0:
			return "rtc0", true
		}
		return "", false
	}
	fuse := specs.LinuxDevice{Path: "/dev/fuse", Type: "c", Major: 10, Minor: 229}
	nvme := specs.LinuxDevice{Path: "/dev/nvme0n1", Type: "b", Major: 259, Minor: 0}
	pmem := specs.LinuxDevice{Path: "/dev/./pmem0", Type: "b", Major: 259, Minor: 0}
	outside := specs.LinuxDevice{Path: "/pmem", Type: "b", Major: 259, Minor: 0}
	renamed := specs.LinuxDevice{Path: "/dev/myfuse", Type: "c", Major: 10, Minor: 229}
	hidraw := specs.LinuxDevice{Path: "/dev/hidraw0", Type: "c", Major: 252, Minor: 0}
	rtc := specs.LinuxDevice{Path: "/dev/rtc0", Type: "c", Major: 252, Minor: 0}
	unnamed := specs.LinuxDevice{Path: "/dev/ttyS0", Type: "c", Major: 4, Minor: 64}
	tun := specs.LinuxDevice{Path: "/dev/net/tun", Type: "c", Major: 10, Minor: 200}
	fifo := specs.LinuxDevice{Path: "/dev/p", Type: "p"}
	allowAll := &specs.LinuxResources{Devices: []specs.LinuxDeviceCgroup{{Allow: false, Access: "rwm"}, {Allow: true, Access: "rwm"}}}
	for _, c := range []struct {
		name    string
		linux   *specs.Linux
		want    []specs.LinuxDevice
		dropped []string
		err     string
	}{
		{name: "none", linux: &specs.Linux{}},
		{name: "the guest has it", linux: &specs.Linux{Devices: []specs.LinuxDevice{fuse, fifo}}, want: []specs.LinuxDevice{fuse, fifo}},
		{name: "the guest lacks it", linux: &specs.Linux{Devices: []specs.LinuxDevice{fuse, tun}}, err: "linux.devices[1] /dev/net/tun (c 10:200): the VM has no such device"},
		{name: "privileged", linux: &specs.Linux{Devices: []specs.LinuxDevice{fuse, tun}, Resources: allowAll}, want: []specs.LinuxDevice{fuse}, dropped: []string{"/dev/net/tun (c 10:200)"}},
		{name: "the guest has the numbers under another name", linux: &specs.Linux{Devices: []specs.LinuxDevice{nvme}}, err: "linux.devices[0] /dev/nvme0n1 (b 259:0): the VM's device with those numbers is /dev/pmem0"},
		{name: "privileged, another name", linux: &specs.Linux{Devices: []specs.LinuxDevice{nvme, fuse}, Resources: allowAll}, want: []specs.LinuxDevice{fuse}, dropped: []string{"/dev/nvme0n1 (b 259:0)"}},
		{name: "the same name, path unclean", linux: &specs.Linux{Devices: []specs.LinuxDevice{pmem}}, want: []specs.LinuxDevice{pmem}},
		{name: "outside /dev, by numbers", linux: &specs.Linux{Devices: []specs.LinuxDevice{outside}}, want: []specs.LinuxDevice{outside}},
		{name: "a guest device without a name", linux: &specs.Linux{Devices: []specs.LinuxDevice{unnamed}}, want: []specs.LinuxDevice{unnamed}},
		{name: "a character device named otherwise in the container", linux: &specs.Linux{Devices: []specs.LinuxDevice{renamed}}, want: []specs.LinuxDevice{renamed}},
		{name: "a dynamic character major under another name", linux: &specs.Linux{Devices: []specs.LinuxDevice{hidraw}}, err: "linux.devices[0] /dev/hidraw0 (c 252:0): the VM's device with those numbers is /dev/rtc0"},
		{name: "a dynamic character major under its name", linux: &specs.Linux{Devices: []specs.LinuxDevice{rtc}}, want: []specs.LinuxDevice{rtc}},
	} {
		t.Run(c.name, func(t *testing.T) {
			dropped, err := fitDevices(c.linux, guest)
			if c.err != "" {
				if err == nil || !strings.Contains(err.Error(), c.err) {
					t.Fatalf("err %v, want %q", err, c.err)
				}
				return
			}
			if err != nil || !reflect.DeepEqual(dropped, c.dropped) || len(c.linux.Devices) != len(c.want) || len(c.want) > 0 && !reflect.DeepEqual(c.linux.Devices, c.want) {
				t.Errorf("devices %+v, dropped %v, err %v; want %+v, %v", c.linux.Devices, dropped, err, c.want, c.dropped)
			}
		})
	}
}

// The guest's devices are read from sysfs with their names: here the test host's.
func TestGuestDevice(t *testing.T) {
	if name, ok := guestDevice("c", 1, 3); !ok || name != "null" {
		t.Errorf("c 1:3 = %q, %v; want null", name, ok)
	}
	if name, ok := guestDevice("b", 4095, 4095); ok {
		t.Errorf("b 4095:4095 = %q, present", name)
	}
}
