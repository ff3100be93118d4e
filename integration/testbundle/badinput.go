package testbundle

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// BadCase is input Kiln must refuse, whichever way it arrives (`kiln run`, containerd), with the strings its
// error must hold.
type BadCase struct {
	Name string
	// Spec changes the container's spec; nil leaves it alone.
	Spec func(*specs.Spec)
	// Hypervisor, when set, is the body of the [hypervisor] table of a Kiln configuration to use instead of the
	// test's.
	Hypervisor string
	Want       []string
}

// FailingQEMUMessage is what the QEMU FailingQEMU writes says before it fails.
const FailingQEMUMessage = "fake-qemu: refusing to start"

// BadInput lists the bad input that every way into Kiln must refuse. kernel and initrd are good guest assets,
// qemu a QEMU that fails at once (FailingQEMU), so that each configuration case has one thing wrong.
func BadInput(kernel, initrd, qemu string) []BadCase {
	return []BadCase{
		{Name: "unknown namespace type", Spec: func(s *specs.Spec) {
			linux(s).Namespaces = append(linux(s).Namespaces, specs.LinuxNamespace{Type: "bogus"})
		}, Want: []string{"linux.namespaces[", `]: unknown namespace type "bogus"`}},
		// The namespaces a VM cannot share with the host: what is left is the guest's, the agent's.
		{Name: "host PID", Spec: func(s *specs.Spec) { dropNamespace(s, specs.PIDNamespace) },
			Want: []string{"no pid namespace (host PID)", "remove hostPID"}},
		{Name: "host IPC", Spec: func(s *specs.Spec) { dropNamespace(s, specs.IPCNamespace) },
			Want: []string{"no ipc namespace (host IPC)", "remove hostIPC"}},
		// Host LSM policy does not reach a guest; the default configuration refuses it (runtime.host_lsm).
		{Name: "AppArmor profile", Spec: func(s *specs.Spec) { s.Process.ApparmorProfile = "kiln-test-profile" },
			Want: []string{`process.apparmorProfile "kiln-test-profile"`, `runtime.host_lsm = "ignore"`}},
		// What only the host has: CPUs to pin to, huge pages.
		{Name: "cpuset", Spec: func(s *specs.Spec) { resources(s).CPU = &specs.LinuxCPU{Cpus: "0"} },
			Want: []string{`linux.resources.cpu.cpus = "0" names host CPUs`}},
		{Name: "huge pages", Spec: func(s *specs.Spec) {
			resources(s).HugepageLimits = []specs.LinuxHugepageLimit{{Pagesize: "2MB", Limit: 4 << 20}}
		}, Want: []string{"linux.resources.hugepageLimits[0] = 4194304 bytes of 2MB pages", "reserves no huge pages"}},
		// Host devices are not passed through: a device the guest's kernel lacks is refused once the guest sees it.
		{Name: "device the VM lacks", Spec: func(s *specs.Spec) {
			linux(s).Devices = append(linux(s).Devices, specs.LinuxDevice{Path: "/dev/kiln-test", Type: "c", Major: 240, Minor: 240})
		}, Want: []string{"/dev/kiln-test (c 240:240): the VM has no such device"}},
		{Name: "negative memory limit", Spec: func(s *specs.Spec) {
			resources(s).Memory = &specs.LinuxMemory{Limit: ptr(int64(-5))}
		}, Want: []string{"linux.resources.memory.limit = -5", "-1 (no limit)"}},
		{Name: "negative CPU quota", Spec: func(s *specs.Spec) {
			resources(s).CPU = &specs.LinuxCPU{Quota: ptr(int64(-2)), Period: ptr(uint64(100000))}
		}, Want: []string{"linux.resources.cpu.quota = -2"}},
		// More than the 4 MiB one message of the agent API (ttrpc) holds.
		{Name: "spec larger than the agent API carries", Spec: func(s *specs.Spec) {
			s.Process.Env = append(s.Process.Env, "BIG="+strings.Repeat("x", 4<<20))
		}, Want: []string{"config.json is larger than 4128768 bytes"}},
		{Name: "bind source missing", Spec: func(s *specs.Spec) {
			s.Mounts = append(s.Mounts, specs.Mount{Type: "bind", Source: "/nonexistent/kiln-bind-source", Destination: "/mnt/x", Options: []string{"rbind"}})
		}, Want: []string{"/nonexistent/kiln-bind-source", "/mnt/x"}},
		{Name: "missing kernel", Hypervisor: fmt.Sprintf("kernel = %q\ninitrd = %q", "/nonexistent/vmlinuz", initrd),
			Want: []string{"hypervisor.kernel", "/nonexistent/vmlinuz"}},
		{Name: "missing initrd", Hypervisor: fmt.Sprintf("kernel = %q\ninitrd = %q", kernel, "/nonexistent/initrd.img"),
			Want: []string{"hypervisor.initrd", "/nonexistent/initrd.img"}},
		{Name: "QEMU exits at once", Hypervisor: fmt.Sprintf("kernel = %q\ninitrd = %q\npath = %q", kernel, initrd, qemu),
			Want: []string{"QEMU", FailingQEMUMessage}},
	}
}

// dropNamespace takes the namespace of type t out of s, as a client asking for the host's does.
func dropNamespace(s *specs.Spec, t specs.LinuxNamespaceType) {
	linux(s).Namespaces = slices.DeleteFunc(linux(s).Namespaces, func(n specs.LinuxNamespace) bool { return n.Type == t })
}

// testingT is what PublicDir and FailingQEMU need of a test.
type testingT interface {
	Helper()
	Fatal(args ...any)
	TempDir() string
}

// PublicDir is a temporary directory of the test that every user can reach and read, as /usr/local is: QEMU runs
// as an unprivileged user (hypervisor.user) and must reach what it is given there.
func PublicDir(t testingT) string {
	t.Helper()
	dir := t.TempDir()
	for _, d := range []string{filepath.Dir(dir), dir} {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// FailingQEMU writes a "QEMU" that fails at once saying FailingQEMUMessage, in a PublicDir.
func FailingQEMU(t testingT) string {
	t.Helper()
	path := filepath.Join(PublicDir(t), "qemu-system-x86_64")
	if err := os.WriteFile(path, []byte("#!/bin/sh\necho '"+FailingQEMUMessage+"' >&2\nexit 1\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	return path
}

func linux(s *specs.Spec) *specs.Linux {
	if s.Linux == nil {
		s.Linux = &specs.Linux{}
	}
	return s.Linux
}

// resources are the spec's resources, made when missing.
func resources(s *specs.Spec) *specs.LinuxResources {
	if linux(s).Resources == nil {
		s.Linux.Resources = &specs.LinuxResources{}
	}
	return s.Linux.Resources
}

func ptr[T any](v T) *T { return &v }
