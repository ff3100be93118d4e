package share

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/kiln-runtime/kiln/mounttree"
)

// sharedHostTree is a host directory the way systemd hosts have them: a mount in a shared peer group, holding a
// submount with a file in it (src/sub/marker). Everything is unmounted when the test ends.
func sharedHostTree(t *testing.T) (src, sub string) {
	t.Helper()
	src = filepath.Join(t.TempDir(), "src")
	sub = filepath.Join(src, "sub")
	if err := os.Mkdir(src, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("tmpfs", src, "tmpfs", 0, "size=1m"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := mounttree.UnmountUnder(src); err != nil {
			t.Errorf("unmount host tree: %v", err)
		}
	})
	// Private first so the test's tmpfs does not join whatever group its parent is in, then shared in a group
	// of its own.
	for _, flag := range []uintptr{unix.MS_PRIVATE, unix.MS_SHARED} {
		if err := unix.Mount("", src, "", flag, ""); err != nil {
			t.Fatal(err)
		}
	}
	write(t, filepath.Join(src, "top"), "top")
	if err := os.Mkdir(sub, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("tmpfs", sub, "tmpfs", 0, "size=1m"); err != nil {
		t.Fatal(err)
	}
	write(t, filepath.Join(sub, "marker"), "host submount")
	return src, sub
}

func isMountPoint(t *testing.T, path string) bool {
	t.Helper()
	mps, err := mounttree.Points(path)
	if err != nil {
		t.Fatal(err)
	}
	for _, mp := range mps {
		if mp == path {
			return true
		}
	}
	return false
}

// exported is where a guest path returned by the share is on the host, in the export.
func exported(s *Share, guest string) string {
	return filepath.Join(s.ExportDir(), strings.TrimPrefix(guest, GuestDir+"/"))
}

// Removing a container, or closing the share, unmounts the share's copies of the container's binds; the host's
// mounts they were copied from stay (issue 11, finding 1: the copies were peers of the host's mounts, so the
// lazy unmounts propagated back and took the host's submounts away).
func TestRemovingBindsLeavesTheHostsSubmounts(t *testing.T) {
	requireRoot(t)
	for _, how := range []string{"RemoveContainer", "Close"} {
		t.Run(how, func(t *testing.T) {
			src, sub := sharedHostTree(t)
			s := newTestShare(t)
			ctx := context.Background()
			rw, err := s.AddBind(ctx, "c1", src, false)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := s.AddBind(ctx, "c1", src, true); err != nil {
				t.Fatal(err)
			}
			if _, err := s.AddRootfs(ctx, "c1", src, true); err != nil {
				t.Fatal(err)
			}
			if got := read(t, filepath.Join(exported(s, rw), "sub", "marker")); got != "host submount" {
				t.Fatalf("export shows %q in the submount", got)
			}
			switch how {
			case "RemoveContainer":
				if err := s.RemoveContainer(ctx, "c1"); err != nil {
					t.Fatal(err)
				}
			case "Close":
				if err := s.Close(); err != nil {
					t.Fatal(err)
				}
			}
			if !isMountPoint(t, sub) {
				t.Fatalf("host submount %s unmounted by %s", sub, how)
			}
			if got := read(t, filepath.Join(sub, "marker")); got != "host submount" {
				t.Errorf("host submount holds %q", got)
			}
			if !isMountPoint(t, src) {
				t.Errorf("host mount %s unmounted by %s", src, how)
			}
		})
	}
}

// A bind source is a slave of the host's mount: what the host mounts under it after it was shared still
// reaches the export (so the guest sees it), and what is mounted on the share's copy never reaches the host.
func TestBindSourceIsASlaveOfTheHost(t *testing.T) {
	requireRoot(t)
	src, _ := sharedHostTree(t)
	s := newTestShare(t)
	ctx := context.Background()
	guest, err := s.AddBind(ctx, "c1", src, false)
	if err != nil {
		t.Fatal(err)
	}
	late := filepath.Join(src, "late")
	if err := os.Mkdir(late, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("tmpfs", late, "tmpfs", 0, "size=1m"); err != nil {
		t.Fatal(err)
	}
	write(t, filepath.Join(late, "f"), "mounted late")
	if got := read(t, filepath.Join(exported(s, guest), "late", "f")); got != "mounted late" {
		t.Errorf("host mount made after the bind not in the export: %q", got)
	}

	// Kiln's own mounts happen under mounts/; one on the copy of the bind must not appear on the host.
	back := filepath.Join(s.mounts, strings.TrimPrefix(guest, GuestDir+"/"), "sub")
	if err := unix.Mount("tmpfs", back, "tmpfs", 0, "size=1m"); err != nil {
		t.Fatal(err)
	}
	write(t, filepath.Join(back, "from-share"), "x")
	if _, err := os.Stat(filepath.Join(src, "sub", "from-share")); err == nil {
		t.Error("a mount on the share's copy of a bind appeared on the host")
	}
}

// An OCI "bind" exports the source's own mount, an "rbind" the mounts below it as well, for spec mounts and for
// a root file system given as mounts (issue 11, finding 8: every bind was exported recursively).
func TestPlainBindLeavesOutTheMountsBelowItsSource(t *testing.T) {
	requireRoot(t)
	src, _ := sharedHostTree(t)
	s := newTestShare(t)
	ctx := context.Background()
	spec := &specs.Spec{Mounts: []specs.Mount{
		{Destination: "/bind", Type: "bind", Source: src, Options: []string{"bind", "ro"}},
		{Destination: "/typed", Type: "bind", Source: src},
		{Destination: "/rbind", Type: "bind", Source: src, Options: []string{"rbind", "ro"}},
	}}
	if err := s.ShareSpecMounts(ctx, "c1", t.TempDir(), spec, nil); err != nil {
		t.Fatal(err)
	}
	for i, recursive := range []bool{false, false, true} {
		m := spec.Mounts[i]
		dir := exported(s, m.Source)
		if got := read(t, filepath.Join(dir, "top")); got != "top" {
			t.Errorf("%s: source's own files: %q", m.Destination, got)
		}
		_, err := os.Stat(filepath.Join(dir, "sub", "marker"))
		if recursive && err != nil {
			t.Errorf("%s (%q): submount missing from the export: %v", m.Destination, m.Options, err)
		}
		if !recursive && err == nil {
			t.Errorf("%s (%q): submount exported by a non-recursive bind", m.Destination, m.Options)
		}
	}

	for _, tc := range []struct {
		id        string
		opts      []string
		recursive bool
	}{{"r1", []string{"bind", "ro"}, false}, {"r2", []string{"rbind", "ro"}, true}} {
		rel, err := s.AddRootfsMounts(ctx, tc.id, []Mount{{Type: "bind", Source: src, Options: tc.opts}}, false)
		if err != nil {
			t.Fatal(err)
		}
		_, err = os.Stat(filepath.Join(s.ExportDir(), rel, "sub", "marker"))
		if tc.recursive != (err == nil) {
			t.Errorf("rootfs mount %q: submount exported = %v, want %v", tc.opts, err == nil, tc.recursive)
		}
	}
}

// Mounts the caller says are the guest's own (the pod's shm) pass as they are and keep their place after an
// "rbind" whose submounts add mounts before them: a replacement by index put the pod's shm over the next
// mount (a pod's resolv.conf) and left a private tmpfs at /dev/shm.
func TestGuestOwnMountsKeepTheirPlace(t *testing.T) {
	requireRoot(t)
	src, _ := sharedHostTree(t)
	_, _, hostFile := hostTree(t)
	s := newTestShare(t)
	shm := specs.Mount{Destination: "/dev/shm", Type: "bind", Source: "/run/kiln/shm", Options: []string{"rbind"}}
	spec := &specs.Spec{Mounts: []specs.Mount{
		{Destination: "/hp", Type: "bind", Source: src, Options: []string{"rbind"}},
		shm,
		{Destination: "/etc/resolv.conf", Type: "bind", Source: hostFile, Options: []string{"rbind", "ro"}},
	}}
	if err := s.ShareSpecMounts(context.Background(), "c1", t.TempDir(), spec, func(i int) bool { return i == 1 }); err != nil {
		t.Fatal(err)
	}
	var dests []string
	for _, m := range spec.Mounts {
		dests = append(dests, m.Destination)
	}
	if want := []string{"/hp", "/hp/sub", "/dev/shm", "/etc/resolv.conf"}; !slices.Equal(dests, want) {
		t.Fatalf("mounts %q, want %q", dests, want)
	}
	if !reflect.DeepEqual(spec.Mounts[2], shm) {
		t.Errorf("the guest's own mount became %+v, want it as it was", spec.Mounts[2])
	}
	if got := read(t, exported(s, spec.Mounts[3].Source)); got != "127.0.0.1 localhost" {
		t.Errorf("the mount after it: %+v reads %q", spec.Mounts[3], got)
	}
}

// A mount below an "rbind" source becomes a bind mount of its own right after its parent, so that the guest mounts
// it with its own flags rather than those of the container's bind it is reached through (a read-write tmpfs below
// a non-recursive "ro" hostPath stayed read-only in the guest, where runc leaves it writable).
func TestRecursiveBindGivesEachSubmountItsOwnMount(t *testing.T) {
	requireRoot(t)
	src, _ := sharedHostTree(t)
	deeper := filepath.Join(src, "sub", "deeper")
	if err := os.Mkdir(deeper, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("tmpfs", deeper, "tmpfs", 0, "size=1m"); err != nil {
		t.Fatal(err)
	}
	s := newTestShare(t)
	for _, tc := range []struct {
		name string
		opts []string
		want []string // options of each submount's bind
	}{
		{"ro", []string{"rbind", "ro"}, []string{"bind"}},
		{"rro", []string{"rbind", "ro", "rro"}, []string{"bind", "ro"}},
		{"propagation", []string{"rbind", "rprivate", "nosuid"}, []string{"bind", "rprivate"}},
		{"plain bind", []string{"bind", "ro"}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			spec := &specs.Spec{Mounts: []specs.Mount{
				{Destination: "/proc", Type: "proc", Source: "proc"},
				{Destination: "/data", Type: "bind", Source: src, Options: tc.opts},
				{Destination: "/dev/shm", Type: "tmpfs", Source: "shm"},
			}}
			if err := s.ShareSpecMounts(context.Background(), "c-"+strings.ReplaceAll(tc.name, " ", "-"), t.TempDir(), spec, nil); err != nil {
				t.Fatal(err)
			}
			var got []string
			for _, m := range spec.Mounts {
				got = append(got, m.Destination)
			}
			want := []string{"/proc", "/data", "/data/sub", "/data/sub/deeper", "/dev/shm"}
			if tc.want == nil {
				want = []string{"/proc", "/data", "/dev/shm"}
			}
			if !slices.Equal(got, want) {
				t.Fatalf("mount destinations %q, want %q", got, want)
			}
			if tc.want == nil {
				return
			}
			parent := spec.Mounts[1].Source
			for i, rel := range []string{"sub", "sub/deeper"} {
				m := spec.Mounts[2+i]
				if m.Type != "bind" || m.Source != parent+"/"+rel || !slices.Equal(m.Options, tc.want) {
					t.Errorf("submount %s: %+v, want a bind of %s with %q", rel, m, parent+"/"+rel, tc.want)
				}
			}
			if got := read(t, filepath.Join(exported(s, spec.Mounts[2].Source), "marker")); got != "host submount" {
				t.Errorf("submount's source in the export: %q", got)
			}
		})
	}
}

// A bind whose source is a Unix socket or a named pipe is refused naming it: through virtio-fs the guest would
// see the file but never reach the host's end (a docker.sock bind, a hostPath of type Socket). Nothing of it is
// left in the share.
func TestBindOfAConnectionIsRefused(t *testing.T) {
	requireRoot(t)
	dir := t.TempDir()
	sock := filepath.Join(dir, "app.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	fifo := filepath.Join(dir, "fifo")
	if err := unix.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	s := newTestShare(t)
	for src, kind := range map[string]string{sock: "Unix socket", fifo: "named pipe"} {
		_, err := s.AddBind(context.Background(), "c1", src, false)
		if !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), src+" is a "+kind) {
			t.Errorf("bind of %s: %v, want an invalid argument naming it a %s", src, err, kind)
		}
	}
	if entries, _ := os.ReadDir(filepath.Join(s.mounts, podBinds)); len(entries) != 0 {
		t.Errorf("refused binds left %v in the share", entries)
	}
}

// MountsBelow lists what a recursive bind of a directory shows mounted below it, the mounts to bind apart from a
// read-only root exported alone: one each path, none below another, none covered by a later mount; and a
// read-only root's export shows none of them.
func TestMountsBelow(t *testing.T) {
	requireRoot(t)
	dir := filepath.Join(t.TempDir(), "root")
	mountAt := func(rel string) {
		t.Helper()
		p := filepath.Join(dir, rel)
		if err := os.MkdirAll(p, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := unix.Mount("tmpfs", p, "tmpfs", 0, "size=1m"); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := mounttree.UnmountUnder(dir); err != nil {
			t.Errorf("unmount host tree: %v", err)
		}
	})
	for _, rel := range []string{"a", "a/b", "c", "c", "d/e", "d"} {
		mountAt(rel)
	}
	if err := os.WriteFile(filepath.Join(dir, "a", "marker"), []byte("submount"), 0o644); err != nil {
		t.Fatal(err)
	}
	real, got, err := MountsBelow(dir)
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{filepath.Join(dir, "a"), filepath.Join(dir, "c"), filepath.Join(dir, "d")}; real != dir || !slices.Equal(got, want) {
		t.Errorf("MountsBelow = %s, %q, want %s, %q", real, got, dir, want)
	}
	s := newTestShare(t)
	rel, err := s.AddRootfs(context.Background(), "c1", dir, true)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(s.ExportDir(), rel, "a", "marker")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a read-only root's export shows a mount below it: %v", err)
	}
	// A mount over the root itself hides every one below it, which mountinfo still lists; so does one above it.
	mountAt("")
	if _, got, err := MountsBelow(dir); err != nil || len(got) != 0 {
		t.Errorf("MountsBelow of a root mounted over = %q, %v; want none", got, err)
	}
	if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("tmpfs", filepath.Dir(dir), "tmpfs", 0, "size=1m"); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if _, got, err := MountsBelow(dir); err != nil || len(got) != 0 {
		t.Errorf("MountsBelow of a root whose parent was mounted over = %q, %v; want none", got, err)
	}
	if err := unix.Unmount(filepath.Dir(dir), unix.MNT_DETACH); err != nil {
		t.Fatal(err)
	}
}
