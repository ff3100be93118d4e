package integration

import (
	"os"
	"testing"

	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// What containers run on runc hosts runs in the guest too: a 32-bit x86 program (an i386 image, a 32-bit tool in
// an amd64 one) with the system calls of 32-bit time its C library makes, and a TUN interface made through
// /dev/net/tun (a VPN client: wireguard-go, openvpn, tailscale),
// given the device as runc gives it, with CAP_NET_ADMIN.
func TestGuestRuns32BitProgramsAndTUN(t *testing.T) {
	v := newContainerVM(t, 256)
	v.installStatic(t, "./integration/tunguest", "GOARCH=386")
	spec := v.spec("tunguest")
	caps := append(spec.Process.Capabilities.Bounding, "CAP_NET_ADMIN")
	spec.Process.Capabilities = &specs.LinuxCapabilities{Bounding: caps, Effective: caps, Permitted: caps}
	mode := os.FileMode(0o666)
	spec.Linux.Devices = append(spec.Linux.Devices, specs.LinuxDevice{Path: "/dev/net/tun", Type: "c", Major: 10, Minor: 200, FileMode: &mode})
	spec.Linux.Resources.Devices = append(spec.Linux.Resources.Devices,
		specs.LinuxDeviceCgroup{Allow: true, Type: "c", Major: ptr(int64(10)), Minor: ptr(int64(200)), Access: "rwm"})
	out, errOut, status := v.output(t, "tun", spec)
	if status != 0 || out != "bits 32\ntime32 ok\ntun kilntun0\n" {
		t.Errorf("stdout %q (stderr %q, status %d), want a 32-bit program whose 32-bit time calls work, and that made kilntun0", out, errOut, status)
	}
}
