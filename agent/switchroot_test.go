package agent

import (
	"strings"
	"testing"
)

func TestVisibleRootCanPivot(t *testing.T) {
	for _, tc := range []struct {
		name  string
		table string
		want  bool
	}{
		{"initramfs", "1 1 0:2 / / rw - rootfs rootfs rw,size=100k\n22 1 0:20 / /proc rw,nosuid - proc proc rw\n", false},
		{"initramfs bound over itself (LeaveInitramfs)", "1 1 0:2 / / rw - rootfs rootfs rw\n21 1 0:2 / / rw - rootfs rootfs rw\n", true},
		{"seen from the new root", "21 1 0:2 / / rw - rootfs rootfs rw\n22 21 0:20 / /proc rw - proc proc rw\n", true},
		{"a tmpfs over the initramfs", "1 1 0:2 / / rw - rootfs rootfs rw\n30 1 0:30 / / rw - tmpfs tmpfs rw\n", true},
		{"disk root", "25 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n", true},
		{"no root listed", "22 1 0:20 / /proc rw - proc proc rw\n", false},
	} {
		got, err := rootCanPivot(strings.NewReader(tc.table))
		if err != nil || got != tc.want {
			t.Errorf("%s: can pivot = %v, %v; want %v", tc.name, got, err, tc.want)
		}
	}
	if _, err := RootCanPivot(); err != nil {
		t.Errorf("the test host's root: %v", err)
	}
}
