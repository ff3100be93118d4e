package agent

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestReadGuestInfo(t *testing.T) {
	info, err := ReadGuestInfo("testdata/guest")
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct{ field, got, want string }{
		{"kernel release", info.KernelRelease, "6.1.0-31-cloud-amd64"},
		{"kernel version", info.KernelVersion, "#1 SMP PREEMPT_DYNAMIC Debian 6.1.128-1 (2025-02-07)"},
		{"boot id", info.BootId, "3f2a9c7e-1b1d-4a8e-9d0c-5b8f4e2a7c11"},
		{"hostname", info.Hostname, "kiln-guest"},
		{"cmdline", info.KernelCmdline, "console=ttyS0 tsc=reliable kiln.debug=1 -- init-arg"},
	} {
		if c.got != c.want {
			t.Errorf("%s = %q, want %q", c.field, c.got, c.want)
		}
	}
	if !info.PivotRoot {
		t.Error("pivot_root: the mount table's root is a bind over the initial ramfs, want true")
	}
	if info.MemoryTotalBytes != 484064*1024 || info.MemoryAvailableBytes != 441260*1024 {
		t.Errorf("memory total/available = %d/%d", info.MemoryTotalBytes, info.MemoryAvailableBytes)
	}
	if info.Vcpus != 2 {
		t.Errorf("vcpus = %d, want 2", info.Vcpus)
	}
	if got := info.Uptime.AsDuration(); got != 1730*time.Millisecond {
		t.Errorf("uptime = %v, want 1.73s", got)
	}
}

// Copies the test guest root, then removes or replaces one file.
func guestRootWith(t *testing.T, rel string, content *string) string {
	t.Helper()
	root := t.TempDir()
	if err := os.CopyFS(root, os.DirFS("testdata/guest")); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(root, rel)
	if content == nil {
		if err := os.Remove(path); err != nil {
			t.Fatal(err)
		}
	} else if err := os.WriteFile(path, []byte(*content), 0o644); err != nil {
		t.Fatal(err)
	}
	return root
}

func TestReadGuestInfoErrorsNameTheFile(t *testing.T) {
	str := func(s string) *string { return &s }
	for _, tc := range []struct {
		rel     string
		content *string
	}{
		{"proc/sys/kernel/osrelease", nil},
		{"proc/sys/kernel/random/boot_id", nil},
		{"proc/meminfo", nil},
		{"proc/meminfo", str("MemFree: 1 kB\n")},
		{"proc/meminfo", str("MemTotal: lots kB\n")},
		{"proc/uptime", str("")},
		{"proc/uptime", str("-3.00 1.00")},
		{"sys/devices/system/cpu/online", str("3-1")},
		{"sys/devices/system/cpu/online", nil},
	} {
		_, err := ReadGuestInfo(guestRootWith(t, tc.rel, tc.content))
		if err == nil {
			t.Errorf("%s = %v: no error", tc.rel, tc.content)
			continue
		}
		if base := filepath.Base(tc.rel); !strings.Contains(err.Error(), base) && !strings.Contains(err.Error(), "cpus") {
			t.Errorf("%s: error %q does not say what was read", tc.rel, err)
		}
	}
}

func TestCountCPUList(t *testing.T) {
	for _, tc := range []struct {
		in      string
		want    uint32
		wantErr bool
	}{
		{"0", 1, false},
		{"0-1\n", 2, false},
		{"0-3,6,8-9", 7, false},
		{"", 0, false},
		{"a", 0, true},
		{"2-x", 0, true},
		{"5-4", 0, true},
	} {
		got, err := countCPUList(tc.in)
		if got != tc.want || (err != nil) != tc.wantErr {
			t.Errorf("countCPUList(%q) = %d, %v; want %d, error %v", tc.in, got, err, tc.want, tc.wantErr)
		}
	}
}
