package agent

import (
	"strings"
	"testing"
)

// The host's own mount table has / and /proc.
func TestReadMountPoints(t *testing.T) {
	points, err := readMountPoints()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{"/", "/proc"} {
		if !points[p] {
			t.Errorf("mount point %q missing from %v", p, points)
		}
	}
	if mounted, err := isMountPoint("/proc"); err != nil || !mounted {
		t.Errorf("isMountPoint(/proc) = %v, %v", mounted, err)
	}
	if mounted, err := isMountPoint("/proc/self"); err != nil || mounted {
		t.Errorf("isMountPoint(/proc/self) = %v, %v", mounted, err)
	}
}

// A mount must come after the mount its target lives on, or it would be
// hidden by it: /dev/pts after /dev, cgroup after /sys, and no early mount
// below a late one. /proc comes first because MountAll reads mountinfo.
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
