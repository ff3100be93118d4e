package network

import "testing"

func TestSysctlFile(t *testing.T) {
	for name, want := range map[string]string{
		"net.ipv4.ip_unprivileged_port_start": "/proc/sys/net/ipv4/ip_unprivileged_port_start",
		"net.ipv4.conf.eth0/100.rp_filter":    "/proc/sys/net/ipv4/conf/eth0.100/rp_filter",
		"net.ipv4.//.x":                       "",
		"net.ipv4./":                          "",
		"kernel.shmmax":                       "",
		"net":                                 "",
		"net.ipv4..x":                         "",
		"net.ipv4.x\n":                        "",
		"net.ipv4.x y":                        "",
		"net.ipv4.é":                          "",
		"netx.ipv4":                           "",
		"net.":                                "",
		".net.ipv4":                           "",
		"net.core.somaxconn-x_1":              "/proc/sys/net/core/somaxconn-x_1",
	} {
		got, ok := sysctlFile(name)
		if got != want || ok != (want != "") {
			t.Errorf("%q: %q %v, want %q", name, got, ok, want)
		}
	}
}
