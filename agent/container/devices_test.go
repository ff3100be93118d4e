package container

import (
	"reflect"
	"strings"
	"testing"

	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// A device the guest has stays; one it lacks is refused naming it, or left out for a container allowed every
// device (privileged: its runtime listed all of the host's).
func TestFitDevices(t *testing.T) {
	has := func(typ string, major, minor int64) bool { return typ == "c" && major == 10 && minor == 229 } // /dev/fuse
	fuse := specs.LinuxDevice{Path: "/dev/fuse", Type: "c", Major: 10, Minor: 229}
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
	} {
		t.Run(c.name, func(t *testing.T) {
			dropped, err := fitDevices(c.linux, has)
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
