package container

import (
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/moby/sys/mountinfo"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"
)

func TestSharedSources(t *testing.T) {
	spec := &specs.Spec{Mounts: []specs.Mount{
		{Destination: "/a", Type: "bind", Source: "/run/kiln/shared/_binds/1/vol", Options: []string{"rbind"}},
		{Destination: "/b", Source: "/run/kiln/shared/_binds/1/vol", Options: []string{"rbind", "ro"}},
		{Destination: "/c", Source: "/run/kiln/shared/_binds/2/hosts", Options: []string{"bind"}},
		{Destination: "/proc", Type: "proc", Source: "proc"},
		{Destination: "/d", Type: "bind", Source: "/elsewhere", Options: []string{"rbind"}},
		{Destination: "/e", Type: "bind", Source: "/run/kiln/shared-not", Options: []string{"rbind"}},
	}}
	got := sharedSources(spec, "/run/kiln/shared")
	if want := []string{"/run/kiln/shared/_binds/1/vol", "/run/kiln/shared/_binds/2/hosts"}; !slices.Equal(got, want) {
		t.Errorf("sharedSources = %q, want %q", got, want)
	}
}

// A source stays mounted while a container uses it, and is unmounted when the last one goes.
func TestSharedMountsReleaseTheLast(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("mounting needs root")
	}
	src := filepath.Join(t.TempDir(), "vol")
	if err := os.Mkdir(src, 0o755); err != nil {
		t.Fatal(err)
	}
	// Standing in for the guest's virtio-fs submount.
	if err := unix.Mount("tmpfs", src, "tmpfs", 0, ""); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = unix.Unmount(src, unix.MNT_DETACH) })
	log := logrus.NewEntry(logrus.New())
	var m sharedMounts
	m.acquire(log, []string{src})
	m.acquire(log, []string{src})
	m.release(log, []string{src})
	if mounted, err := mountinfo.Mounted(src); err != nil || !mounted {
		t.Fatalf("after one of two users went: mounted %v, %v; want still mounted", mounted, err)
	}
	m.release(log, []string{src})
	if mounted, err := mountinfo.Mounted(src); err != nil || mounted {
		t.Errorf("after the last user went: mounted %v, %v; want unmounted", mounted, err)
	}
	if len(m.users) != 0 {
		t.Errorf("users left: %v", m.users)
	}
}

// A source below another (a volume's host mounts, each shared as a bind of its own) is unmounted before it.
func TestSharedMountsReleaseChildrenFirst(t *testing.T) {
	var order []string
	m := sharedMounts{unmount: func(p string) error { order = append(order, p); return nil }}
	srcs := []string{"/s/_binds/1/vol", "/s/_binds/1/vol/sub", "/s/_binds/2/other", "/s/_binds/1/vol/sub/deeper"}
	log := logrus.NewEntry(logrus.New())
	m.acquire(log, srcs)
	m.release(log, srcs)
	pos := func(p string) int { return slices.Index(order, p) }
	if len(order) != len(srcs) || pos("/s/_binds/1/vol/sub/deeper") > pos("/s/_binds/1/vol/sub") || pos("/s/_binds/1/vol/sub") > pos("/s/_binds/1/vol") {
		t.Errorf("unmounted in the order %q: want each source after those below it", order)
	}
}
