package qemu

import (
	"net"
	"strings"
	"testing"

	"github.com/kiln-runtime/kiln/vm/accel"
)

func TestArgs(t *testing.T) {
	base := Config{ID: "x", Accel: accel.TCG, VCPUs: 2, MemoryMiB: 512, Kernel: "/k", Initrd: "/i", TSCkHz: 2445000}
	tests := []struct {
		name   string
		mutate func(*Config)
		want   []string
		absent []string
	}{
		{name: "tcg", want: []string{"-accel tcg", "-smp 2", "-m 512M", "tsc_early_khz=2445000", "memory-backend-memfd,id=mem,size=512M,share=on,seal=on",
			"-chardev socket,id=vsock,fd=4 -device vhost-user-vsock-device,chardev=vsock", "-no-reboot", "pit=on,pic=on,rtc=on",
			"-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny", "-accel tcg ",
			"-chardev socket,id=qmp,fd=3,server=on,wait=off -mon chardev=qmp,mode=control", "microvm,acpi=off,", " acpi=off", "-cpu kvm64,+lahf_lm", " mitigations=off"},
			// QEMU opens no socket by path.
			absent: []string{"-cpu host", "path=", "unix:", "-runas"}},
		{name: "kvm", mutate: func(c *Config) { c.Accel = accel.KVM }, want: []string{"-accel kvm", "-cpu host", "-sandbox on,"}, absent: []string{"tsc_early_khz", "tb-size", "kvm64", "mitigations=off"}},
		{name: "file-backed memory for templates", mutate: func(c *Config) { c.MemoryFile = "/tpl/mem" },
			want: []string{"memory-backend-file,id=mem,size=512M,mem-path=/tpl/mem,share=on"}},
		{name: "no shared fs by default", absent: []string{"vhost-user-fs-device"}},
		{name: "shared fs", mutate: func(c *Config) { c.SharedDir = "/run/kiln/x.share/shared" },
			want: []string{"-chardev socket,id=fs,fd=5", "-device vhost-user-fs-device,chardev=fs,tag=kiln-shared"}},
		{name: "translation cache", mutate: func(c *Config) { c.TBSizeMiB = 32 }, want: []string{"-accel tcg,tb-size=32 "}},
		{name: "no translation cache under KVM", mutate: func(c *Config) { c.Accel, c.TBSizeMiB = accel.KVM, 32 }, absent: []string{"tb-size"}},
		{name: "free page reporting", mutate: func(c *Config) { c.FreePageReporting = true }, want: []string{"-device virtio-balloon-device,free-page-reporting=on"}},
		{name: "no balloon unless asked", absent: []string{"virtio-balloon"}},
		{name: "no network devices by default", absent: []string{"-netdev", "virtio-net-device"}},
		{name: "two taps after the other descriptors", mutate: func(c *Config) {
			c.Nets = []Net{{MAC: net.HardwareAddr{2, 0, 0, 0, 0, 1}, MTU: 1400}, {MAC: net.HardwareAddr{2, 0, 0, 0, 0, 2}}}
		}, want: []string{"-netdev tap,id=net0,fd=6,vhost=off -device virtio-net-device,netdev=net0,mac=02:00:00:00:00:01,host_mtu=1400",
			"-netdev tap,id=net1,fd=7,vhost=off -device virtio-net-device,netdev=net1,mac=02:00:00:00:00:02"}, absent: []string{"mac=02:00:00:00:00:02,host_mtu"}},
		{name: "a VM that cannot grow", absent: []string{"mem=", "maxcpus="}},
		{name: "vCPUs to bring online", mutate: func(c *Config) { c.MaxVCPUs = 8 }, want: []string{"-smp 8 ", " maxcpus=2"}},
		{name: "a VM that can grow", mutate: func(c *Config) { c.MaxMemoryMiB = 8192 },
			want: []string{"-m 8320M", "memory-backend-memfd,id=mem,size=8320M,", " mem=512M "}},
		{name: "a template that can grow", mutate: func(c *Config) {
			c.MaxMemoryMiB, c.role, c.MemoryFile, c.AgentImage = 4096, roleTemplate, "/tpl/mem", "/a.img"
		},
			want: []string{"-m 4224M,slots=1,maxmem=5248M", "size=4224M,mem-path=/tpl/mem", " mem=512M "}},
		{name: "extra kernel params", mutate: func(c *Config) { c.KernelParams = []string{"kiln.debug=1"} }, want: []string{"kiln.debug=1"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := base
			if tt.mutate != nil {
				tt.mutate(&c)
			}
			vs := &vhostUserVsock{}
			checkArgs(t, args(c, fdLayout{qmp: 3, vsockArgs: vs.qemuArgs(4), virtiofs: 5, firstNet: 6}), tt.want, tt.absent)
		})
	}
}

func TestParseCPUMHz(t *testing.T) {
	got, err := parseCPUMHz(strings.NewReader("processor\t: 0\ncpu MHz\t\t: 2445.432\n"))
	if err != nil || got != 2445432 {
		t.Fatalf("got %d, %v", got, err)
	}
	if _, err := parseCPUMHz(strings.NewReader("processor\t: 0\n")); err == nil {
		t.Fatal("no error without a cpu MHz line")
	}
}

// checkArgs fails unless the command line a holds each of want and none of absent (as substrings of it joined).
func checkArgs(t *testing.T, a, want, absent []string) {
	t.Helper()
	got := strings.Join(a, " ")
	for _, w := range want {
		if !strings.Contains(got, w) {
			t.Errorf("args lack %q:\n%s", w, got)
		}
	}
	for _, x := range absent {
		if strings.Contains(got, x) {
			t.Errorf("args contain %q:\n%s", x, got)
		}
	}
}
