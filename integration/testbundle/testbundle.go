// Package testbundle makes OCI bundles for Kiln's end-to-end tests and benchmarks: a busybox root file system
// from Debian's busybox-static, with a named user and groups, and a config.json shaped like the one `runc spec`
// writes, so neither runc nor a registry is needed. BadInput lists the bundles and configurations that every way
// into Kiln (`kiln run`, containerd) must refuse, so that each of their tests asks the same of Kiln; PublicDir is
// a test directory that the unprivileged user QEMU runs as can reach (an install prefix, a failing QEMU).
package testbundle

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// Busybox is where Debian's busybox-static installs its binary.
const Busybox = "/bin/busybox"

// Names and ids the root file system's /etc/passwd and /etc/group define.
const (
	User      = "kiln"
	UserUID   = 1234
	UserGID   = 1234
	UserHome  = "/home/kiln"
	Group     = "kiln"
	Extra     = "extra"
	ExtraGID  = 2345
	Other     = "other"
	OtherGID  = 3456
	passwd    = "root:x:0:0:root:/root:/bin/sh\nkiln:x:1234:1234:Kiln User:/home/kiln:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
	groupFile = "root:x:0:\ntty:x:5:\nkiln:x:1234:\nextra:x:2345:kiln\nother:x:3456:\nnogroup:x:65534:\n"
)

// Rootfs fills dir (created if missing) with busybox, a symlink per applet in /bin, /etc/passwd and /etc/group,
// and the empty directories a container's mounts need.
func Rootfs(dir string) error {
	for _, d := range []string{"bin", "etc", "proc", "sys", "dev", "tmp", "root", "home/kiln", "mnt", "run"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			return fmt.Errorf("make rootfs dir %s: %w", d, err)
		}
	}
	if err := os.Chmod(filepath.Join(dir, "tmp"), 0o1777); err != nil {
		return err
	}
	if err := os.Chown(filepath.Join(dir, "home/kiln"), UserUID, UserGID); err != nil {
		return fmt.Errorf("chown home: %w", err)
	}
	if err := copyFile(Busybox, filepath.Join(dir, "bin", "busybox"), 0o755); err != nil {
		return fmt.Errorf("copy busybox (apt-get install busybox-static): %w", err)
	}
	out, err := exec.Command(Busybox, "--list").Output()
	if err != nil {
		return fmt.Errorf("list busybox applets: %w", err)
	}
	for _, name := range strings.Fields(string(out)) {
		if name == "busybox" || strings.Contains(name, "/") {
			continue
		}
		if err := os.Symlink("busybox", filepath.Join(dir, "bin", name)); err != nil && !os.IsExist(err) {
			return fmt.Errorf("link applet %s: %w", name, err)
		}
	}
	for name, content := range map[string]string{"etc/passwd": passwd, "etc/group": groupFile, "etc/hostname": "busybox\n"} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644); err != nil {
			return fmt.Errorf("write %s: %w", name, err)
		}
	}
	return nil
}

func copyFile(src, dst string, mode os.FileMode) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, mode)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		_ = out.Close()
		return err
	}
	return out.Close()
}

// DefaultCaps are the capabilities `runc spec` grants.
func DefaultCaps() []string { return []string{"CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"} }

// Spec returns the configuration `runc spec` would write (rootfs "rootfs", read-only; hostname "runc"), running
// args without a terminal.
func Spec(args ...string) *specs.Spec {
	caps := DefaultCaps
	return &specs.Spec{
		Version: specs.Version,
		Process: &specs.Process{
			Terminal: false,
			User:     specs.User{UID: 0, GID: 0},
			Args:     args,
			Env:      []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"},
			Cwd:      "/",
			Capabilities: &specs.LinuxCapabilities{
				Bounding: caps(), Effective: caps(), Permitted: caps(),
			},
			Rlimits:         []specs.POSIXRlimit{{Type: "RLIMIT_NOFILE", Hard: 1024, Soft: 1024}},
			NoNewPrivileges: true,
		},
		Root:     &specs.Root{Path: "rootfs", Readonly: true},
		Hostname: "runc",
		Mounts: []specs.Mount{
			{Destination: "/proc", Type: "proc", Source: "proc"},
			{Destination: "/dev", Type: "tmpfs", Source: "tmpfs", Options: []string{"nosuid", "strictatime", "mode=755", "size=65536k"}},
			{Destination: "/dev/pts", Type: "devpts", Source: "devpts", Options: []string{"nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"}},
			{Destination: "/dev/shm", Type: "tmpfs", Source: "shm", Options: []string{"nosuid", "noexec", "nodev", "mode=1777", "size=65536k"}},
			{Destination: "/dev/mqueue", Type: "mqueue", Source: "mqueue", Options: []string{"nosuid", "noexec", "nodev"}},
			{Destination: "/sys", Type: "sysfs", Source: "sysfs", Options: []string{"nosuid", "noexec", "nodev", "ro"}},
			{Destination: "/sys/fs/cgroup", Type: "cgroup", Source: "cgroup", Options: []string{"nosuid", "noexec", "nodev", "relatime", "ro"}},
		},
		Linux: &specs.Linux{
			Resources: &specs.LinuxResources{
				Devices: []specs.LinuxDeviceCgroup{{Allow: false, Access: "rwm"}},
			},
			Namespaces: []specs.LinuxNamespace{
				{Type: specs.PIDNamespace}, {Type: specs.NetworkNamespace}, {Type: specs.IPCNamespace},
				{Type: specs.UTSNamespace}, {Type: specs.MountNamespace}, {Type: specs.CgroupNamespace},
			},
			MaskedPaths: []string{
				"/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
				"/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi",
			},
			ReadonlyPaths: []string{
				"/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger",
			},
		},
	}
}

// Write makes a bundle at dir: config.json from spec and a busybox root at dir/<spec.Root.Path>.
func Write(dir string, spec *specs.Spec) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	if err := Rootfs(filepath.Join(dir, spec.Root.Path)); err != nil {
		return err
	}
	return WriteConfig(dir, spec)
}

// WriteConfig writes dir/config.json.
func WriteConfig(dir string, spec *specs.Spec) error {
	raw, err := json.MarshalIndent(spec, "", "\t")
	if err != nil {
		return fmt.Errorf("encode config.json: %w", err)
	}
	return os.WriteFile(filepath.Join(dir, "config.json"), raw, 0o644)
}
