package integration

import (
	"slices"
	"strings"
	"testing"

	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// A container's process reaches nothing of its guest beyond the container that runc on a host would not give
// it: the agent's vsock listeners take no connection from inside the guest (vsock has no namespaces; the kernel
// has no loopback transport and the agent takes the host's connections only); a container of a spec without a
// cgroup namespace (one made on a cgroup v1 host) gets one unless privileged, and a privileged one's cgroup
// mount leaves the guest's nsdelegate on; the guest sets no limit on open files the pod's containers share, and
// restricts dmesg as Debian does.
func TestContainerReachesNothingOfItsGuest(t *testing.T) {
	v := newContainerVM(t, 256)
	v.installStatic(t, "./integration/isolationguest")
	noCgroupNS := func(s *specs.Spec) *specs.Spec {
		s.Linux.Namespaces = slices.DeleteFunc(s.Linux.Namespaces, func(n specs.LinuxNamespace) bool { return n.Type == specs.CgroupNamespace })
		return s
	}

	// First a privileged container left in the guest's cgroup namespace: its cgroup mount used to take nsdelegate
	// off for the whole guest.
	priv := noCgroupNS(v.spec("isolationguest"))
	caps := append(slices.Clone(priv.Process.Capabilities.Bounding), "CAP_SYS_ADMIN")
	priv.Process.Capabilities = &specs.LinuxCapabilities{Bounding: caps, Effective: caps, Permitted: caps}
	priv.Linux.MaskedPaths, priv.Linux.ReadonlyPaths = nil, nil
	out, errOut, status := v.output(t, "privileged", priv)
	if status != 0 || !strings.Contains(out, "cgroup 0::/kiln/") || !strings.Contains(out, "nsdelegate true\n") {
		t.Errorf("privileged container: stdout %q (stderr %q, status %d), want it in the guest's cgroup namespace, nsdelegate on", out, errOut, status)
	}

	out, errOut, status = v.output(t, "plain", noCgroupNS(v.spec("isolationguest")))
	if status != 0 {
		t.Fatalf("stdout %q, stderr %q, status %d", out, errOut, status)
	}
	t.Logf("a container without CAP_SYS_ADMIN:\n%s", out)
	for _, want := range []string{"cgroup 0::/\n", "nsdelegate true\n", "fs/file-max 9223372036854775807\n", "kernel/dmesg_restrict 1\n"} {
		if !strings.Contains(out, want) {
			t.Errorf("stdout %q, want %q", out, strings.TrimSpace(want))
		}
	}
	for _, port := range []string{"1024", "1025", "1026"} {
		if strings.Contains(out, "vsock 1:"+port+" open") || !strings.Contains(out, "vsock 1:"+port+" ") {
			t.Errorf("stdout %q: the agent's vsock port %s answered a container, or was not tried", out, port)
		}
	}
}
