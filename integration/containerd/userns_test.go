package containerd

import (
	"strings"
	"testing"
)

// TestKilnUserNamespace runs a container with a user namespace of its own and a root the snapshotter remaps
// through idmapped mounts (`ctr run --uidmap --gidmap --remap-labels`, what CRI does for hostUsers: false): the
// container sees its mappings, the image's root-owned files as its root's (without the host-side idmapped
// mount they would be nobody's, 65534), and a file its root creates as its root's.
func TestKilnUserNamespace(t *testing.T) {
	k := startKiln(t)
	out, errOut, code := k.run(t, "--rm", "--uidmap", "0:200000:65536", "--gidmap", "0:300000:65536", "--remap-labels",
		BusyboxRef, "kiln-userns", "sh", "-c",
		"cat /proc/self/uid_map /proc/self/gid_map; id -u; stat -c %u:%g /bin/busybox /etc; touch /made-by-root; stat -c %u:%g /made-by-root")
	if code != 0 {
		t.Fatalf("exit %d, stderr: %s", code, errOut)
	}
	want := []string{"0 200000 65536", "0 300000 65536", "0", "0:0", "0:0", "0:0"}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != len(want) {
		t.Fatalf("container printed %q, want %d lines", out, len(want))
	}
	for i, w := range want {
		if got := strings.Join(strings.Fields(lines[i]), " "); got != w {
			t.Errorf("line %d of %q is %q, want %q", i, out, got, w)
		}
	}
}
