package network

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"
)

// The pod's sysfs lists the pod namespace's interfaces (lo alone in a new one), not those of the namespace the
// agent runs in; it is mounted once.
func TestSysfsShowsThePodsInterfaces(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to create network namespaces and mount")
	}
	path := filepath.Join(t.TempDir(), "pod")
	p := New(path, logrus.NewEntry(logrus.StandardLogger()))
	dir, err := p.Sysfs()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = unix.Unmount(dir, unix.MNT_DETACH)
		_ = unix.Unmount(path, unix.MNT_DETACH)
	})
	names := func(d string) []string {
		entries, err := os.ReadDir(filepath.Join(d, "class", "net"))
		if err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, e := range entries {
			out = append(out, e.Name())
		}
		return out
	}
	if got := names(dir); !slices.Equal(got, []string{"lo"}) {
		t.Errorf("the pod's sysfs lists %v, want lo alone", got)
	}
	if host := names("/sys"); slices.Equal(host, []string{"lo"}) {
		t.Skipf("the test's own namespace has only lo too (%v): the check above proves nothing here", host)
	}
	again, err := p.Sysfs()
	if err != nil || again != dir {
		t.Errorf("a second Sysfs: %q, %v; want %q", again, err, dir)
	}
	var mounts int
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) > 4 && f[4] == dir {
			mounts++
		}
	}
	if mounts != 1 {
		t.Errorf("%s mounted %d times, want once", dir, mounts)
	}
}
