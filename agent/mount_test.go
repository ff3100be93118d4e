package agent

import (
	"os"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// On the host: / and /proc are mount points; a directory, a symbolic link into
// a mount and a path that does not exist are not.
func TestIsMountPoint(t *testing.T) {
	for _, tc := range []struct {
		path string
		want bool
	}{
		{"/", true},
		{"/proc", true},
		{"/proc/self", false},
		{t.TempDir(), false},
		{"/proc/kiln-does-not-exist", false},
	} {
		if mounted, err := isMountPoint(tc.path); err != nil || mounted != tc.want {
			t.Errorf("isMountPoint(%s) = %v, %v; want %v", tc.path, mounted, err, tc.want)
		}
	}
}

// A directory bound onto itself is on the same device as its parent: only the
// mount table or openat2 tells it is a mount point.
func TestIsMountPointBindMount(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to bind-mount")
	}
	dir := t.TempDir()
	if err := unix.Mount(dir, dir, "", unix.MS_BIND, ""); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = unix.Unmount(dir, unix.MNT_DETACH) })
	if mounted, err := isMountPoint(dir); err != nil || !mounted {
		t.Errorf("isMountPoint(%s) = %v, %v; want true", dir, mounted, err)
	}
}

// A mount must come after the mount its target lives on, or it would be
// hidden by it: /dev/pts after /dev, cgroup after /sys, and no early mount
// below a late one. /proc comes first, for isMountPoint's fallback to mountinfo.
func TestBaseMountsOrder(t *testing.T) {
	early, late := SplitMounts(BaseMounts())
	mounts := append(early, late...)
	if len(mounts) != len(BaseMounts()) {
		t.Fatalf("split into %d early and %d late mounts, want %d in all", len(early), len(late), len(BaseMounts()))
	}
	if mounts[0].Target != "/proc" {
		t.Fatalf("first mount is %s, want /proc", mounts[0].Target)
	}
	seen := map[string]int{}
	for i, m := range mounts {
		if _, dup := seen[m.Target]; dup {
			t.Errorf("%s mounted twice", m.Target)
		}
		seen[m.Target] = i
	}
	for i, m := range mounts {
		for parent, j := range seen {
			if parent != "/" && strings.HasPrefix(m.Target, parent+"/") && j > i {
				t.Errorf("%s is mounted before its parent %s", m.Target, parent)
			}
		}
	}
	for _, want := range []string{"/proc", "/sys", "/dev", "/dev/pts", "/dev/shm", "/run", "/tmp", "/sys/fs/cgroup"} {
		if _, ok := seen[want]; !ok {
			t.Errorf("no mount on %s", want)
		}
	}
}

// What the agent API and the container service use before the guest is
// ready must be mounted early.
func TestBaseMountsEarly(t *testing.T) {
	early, _ := SplitMounts(BaseMounts())
	got := map[string]bool{}
	for _, m := range early {
		got[m.Target] = true
	}
	for _, want := range []string{"/proc", "/sys", "/run"} {
		if !got[want] {
			t.Errorf("%s is not mounted early", want)
		}
	}
}
