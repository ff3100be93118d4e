package share

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/moby/sys/mountinfo"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/kiln-runtime/kiln/mounttree"
)

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("mounting needs root")
	}
}

// newTestShare creates a share in a temporary directory and checks, when the test ends, that Close left
// no mount and no file behind.
func newTestShare(t *testing.T) *Share {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "share")
	s, err := New(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("close: %v", err)
		}
		checkGone(t, s.Dir())
	})
	return s
}

func checkGone(t *testing.T, dir string) {
	t.Helper()
	if mps, err := mounttree.Points(dir); err != nil || len(mps) > 0 {
		t.Errorf("leftover mounts under %s: %v %v", dir, mps, err)
	}
	if _, err := os.Lstat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("leftover directory %s (%v)", dir, err)
	}
}

// hostTree is a container's files as the host has them: rootfs/etc/hostname, a volume directory and a file.
func hostTree(t *testing.T) (rootfs, vol, file string) {
	t.Helper()
	base := t.TempDir()
	rootfs = filepath.Join(base, "rootfs")
	vol = filepath.Join(base, "vol")
	file = filepath.Join(base, "hosts")
	for _, d := range []string{filepath.Join(rootfs, "etc"), vol} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	write(t, filepath.Join(rootfs, "etc", "hostname"), "c1")
	write(t, filepath.Join(vol, "data"), "volume data")
	write(t, file, "127.0.0.1 localhost")
	return rootfs, vol, file
}

func write(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

func read(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestShareLayoutAndPropagation(t *testing.T) {
	requireRoot(t)
	s := newTestShare(t)
	info, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	var sharedLine string
	for _, l := range strings.Split(string(info), "\n") {
		if f := strings.Fields(l); len(f) > 4 && f[4] == s.ExportDir() {
			sharedLine = l
		}
	}
	if !strings.Contains(sharedLine, " master:") || !strings.Contains(sharedLine, " ro,") {
		t.Errorf("export dir should be a read-only slave mount: %q", sharedLine)
	}
	if err := os.Mkdir(filepath.Join(s.ExportDir(), "x"), 0o755); !errors.Is(err, unix.EROFS) {
		t.Errorf("mkdir in the export dir: %v, want EROFS", err)
	}

	rootfs, _, _ := hostTree(t)
	ctx := context.Background()
	rel, err := s.AddRootfs(ctx, "c1", rootfs, false)
	if err != nil {
		t.Fatal(err)
	}
	if rel != "c1/rootfs" {
		t.Errorf("guest path %q", rel)
	}
	exported := filepath.Join(s.ExportDir(), rel)
	if got := read(t, filepath.Join(exported, "etc/hostname")); got != "c1" {
		t.Errorf("exported hostname %q", got)
	}
	// Writable rootfs: a write through the export reaches the host.
	write(t, filepath.Join(exported, "etc/new"), "from guest side")
	if got := read(t, filepath.Join(rootfs, "etc/new")); got != "from guest side" {
		t.Errorf("host sees %q", got)
	}

	// A mount made after the share exists, under mounts/, shows up in the export...
	late := filepath.Join(s.mounts, "c1", "rootfs", "etc")
	if err := unix.Mount("tmpfs", late, "tmpfs", 0, "size=1m"); err != nil {
		t.Fatal(err)
	}
	write(t, filepath.Join(late, "late"), "late mount")
	if got := read(t, filepath.Join(exported, "etc/late")); got != "late mount" {
		t.Errorf("late mount not propagated: %q", got)
	}
	// ...but nothing mounted under the export flows back.
	back := filepath.Join(s.ExportDir(), "c1", "rootfs")
	if err := unix.Mount("tmpfs", back, "tmpfs", 0, "size=1m"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(s.mounts, "c1", "rootfs", "etc", "late")); err != nil {
		t.Errorf("mount under the export propagated back to mounts/: %v", err)
	}

	if err := s.RemoveContainer(ctx, "c1"); err != nil {
		t.Fatal(err)
	}
	if mps, _ := mounttree.Points(filepath.Join(s.Dir(), "shared", "c1")); len(mps) > 0 {
		t.Errorf("mounts left in the export after RemoveContainer: %v", mps)
	}
	if _, err := os.Stat(filepath.Join(s.mounts, "c1")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("container directory left: %v", err)
	}
	// The host's files survive the removal.
	if got := read(t, filepath.Join(rootfs, "etc/hostname")); got != "c1" {
		t.Errorf("host rootfs damaged: %q", got)
	}
}

func TestReadonlyRootfsAndBinds(t *testing.T) {
	requireRoot(t)
	s := newTestShare(t)
	ctx := context.Background()
	rootfs, vol, file := hostTree(t)
	rel, err := s.AddRootfs(ctx, "c2", rootfs, true)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(s.ExportDir(), rel, "etc/x"), nil, 0o644); !errors.Is(err, unix.EROFS) {
		t.Errorf("write into a read-only rootfs: %v, want EROFS", err)
	}
	if _, err := s.AddRootfs(ctx, "c2", rootfs, true); err == nil {
		t.Error("second rootfs for one container accepted")
	}

	guestVol, err := s.AddBind(ctx, "c2", vol, false)
	if err != nil {
		t.Fatal(err)
	}
	guestFile, err := s.AddBind(ctx, "c2", file, true)
	if err != nil {
		t.Fatal(err)
	}
	for guest, want := range map[string]string{guestVol + "/data": "volume data", guestFile: "127.0.0.1 localhost"} {
		if !strings.HasPrefix(guest, GuestDir+"/"+podBinds+"/") {
			t.Errorf("guest path %s not under %s/%s", guest, GuestDir, podBinds)
		}
		host := filepath.Join(s.ExportDir(), strings.TrimPrefix(guest, GuestDir+"/"))
		if got := read(t, host); got != want {
			t.Errorf("%s: %q, want %q", host, got, want)
		}
	}
	if err := os.WriteFile(filepath.Join(s.ExportDir(), strings.TrimPrefix(guestFile, GuestDir+"/")), nil, 0o644); !errors.Is(err, unix.EROFS) {
		t.Errorf("write to a read-only file bind: %v, want EROFS", err)
	}

	// The share refuses to export itself.
	if _, err := s.AddBind(ctx, "c2", s.Dir(), true); err == nil {
		t.Error("binding the share into itself accepted")
	}
	// A writable volume may hold symlinks the guest planted: binds below it are resolved beneath it.
	if err := os.Symlink("/etc", filepath.Join(vol, "planted")); err != nil {
		t.Fatal(err)
	}
	if _, err := s.AddBind(ctx, "c3", filepath.Join(vol, "planted"), true); !errors.Is(err, ErrEscape) {
		t.Errorf("bind through a planted symlink: %v, want ErrEscape", err)
	}
}

func TestShareSpecMounts(t *testing.T) {
	requireRoot(t)
	s := newTestShare(t)
	ctx := context.Background()
	bundle := t.TempDir()
	if err := os.MkdirAll(filepath.Join(bundle, "rootfs", "data"), 0o755); err != nil {
		t.Fatal(err)
	}
	write(t, filepath.Join(bundle, "rootfs", "data", "f"), "bundle data")
	if err := os.Symlink("/etc", filepath.Join(bundle, "rootfs", "evil")); err != nil {
		t.Fatal(err)
	}
	_, _, hostFile := hostTree(t)
	spec := &specs.Spec{Mounts: []specs.Mount{
		{Destination: "/proc", Type: "proc", Source: "proc"},
		{Destination: "/etc/hosts", Type: "bind", Source: hostFile, Options: []string{"rbind", "ro"}},
		{Destination: "/data", Type: "none", Source: "rootfs/data", Options: []string{"bind"}},
	}}
	if err := s.ShareSpecMounts(ctx, "c4", bundle, spec, nil); err != nil {
		t.Fatal(err)
	}
	if spec.Mounts[0].Source != "proc" {
		t.Errorf("proc mount changed: %+v", spec.Mounts[0])
	}
	for i, want := range map[int]string{1: "127.0.0.1 localhost", 2: "bundle data"} {
		m := spec.Mounts[i]
		host := filepath.Join(s.ExportDir(), strings.TrimPrefix(m.Source, GuestDir+"/"))
		if i == 2 {
			host = filepath.Join(host, "f")
		}
		if got := read(t, host); got != want {
			t.Errorf("mount %d (%s): %q, want %q", i, m.Source, got, want)
		}
	}

	escaping := &specs.Spec{Mounts: []specs.Mount{{Destination: "/x", Type: "bind", Source: "rootfs/evil/passwd"}}}
	if err := s.ShareSpecMounts(ctx, "c5", bundle, escaping, nil); !errors.Is(err, ErrEscape) {
		t.Errorf("escaping bundle source: %v, want ErrEscape", err)
	}
	if escaping.Mounts[0].Source != "rootfs/evil/passwd" {
		t.Errorf("spec changed on error: %+v", escaping.Mounts[0])
	}
}

func TestAddRootfsMountsOverlay(t *testing.T) {
	requireRoot(t)
	s := newTestShare(t)
	base := t.TempDir()
	lower, upper, work := filepath.Join(base, "lower"), filepath.Join(base, "upper"), filepath.Join(base, "work")
	for _, d := range []string{lower, upper, work} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	write(t, filepath.Join(lower, "layer"), "from lower")
	rel, err := s.AddRootfsMounts(context.Background(), "c6", []Mount{{
		Type: "overlay", Source: "overlay",
		Options: []string{"lowerdir=" + lower, "upperdir=" + upper, "workdir=" + work},
	}}, false)
	if err != nil {
		t.Fatal(err)
	}
	exported := filepath.Join(s.ExportDir(), rel)
	if got := read(t, filepath.Join(exported, "layer")); got != "from lower" {
		t.Errorf("overlay content %q", got)
	}
	write(t, filepath.Join(exported, "new"), "written")
	if got := read(t, filepath.Join(upper, "new")); got != "written" {
		t.Errorf("upper dir has %q", got)
	}
	// Bad mounts leave nothing behind.
	if _, err := s.AddRootfsMounts(context.Background(), "c7", []Mount{{Type: "overlay", Source: "overlay", Options: []string{"lowerdir=/nonexistent"}}}, false); err == nil {
		t.Error("bad overlay accepted")
	}
	if mps, _ := mounttree.Points(filepath.Join(s.mounts, "c7")); len(mps) > 0 {
		t.Errorf("failed rootfs left mounts %v", mps)
	}
}

// An overlay of more layers than mount(2)'s page of options holds (an image of some 60 layers in containerd's
// snapshot directories) mounts whole: every layer, the bottom one included, is there.
func TestAddRootfsMountsManyLayers(t *testing.T) {
	requireRoot(t)
	s := newTestShare(t)
	// As long as containerd's: /var/lib/containerd/io.containerd.snapshotter.v1.overlayfs/snapshots/<n>/fs.
	base := filepath.Join(t.TempDir(), "io.containerd.snapshotter.v1.overlayfs", "snapshots")
	var lowers []string
	for i := 1; i <= 80; i++ {
		d := filepath.Join(base, strconv.Itoa(1000+i), "fs")
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
		write(t, filepath.Join(d, fmt.Sprintf("layer%d", i)), strconv.Itoa(i))
		lowers = append([]string{d}, lowers...) // the top layer first
	}
	upper, work := filepath.Join(base, "2000", "fs"), filepath.Join(base, "2000", "work")
	for _, d := range []string{upper, work} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	opts := []string{"index=off", "lowerdir=" + strings.Join(lowers, ":"), "upperdir=" + upper, "workdir=" + work}
	if n := len(strings.Join(opts, ",")); n < 4096 {
		t.Fatalf("options of %d bytes: the test wants more than a page", n)
	}
	rel, err := s.AddRootfsMounts(context.Background(), "many", []Mount{{Type: "overlay", Source: "overlay", Options: opts}}, false)
	if err != nil {
		t.Fatal(err)
	}
	exported := filepath.Join(s.ExportDir(), rel)
	for _, i := range []int{1, 40, 80} {
		if got := read(t, filepath.Join(exported, fmt.Sprintf("layer%d", i))); got != strconv.Itoa(i) {
			t.Errorf("layer %d reads %q", i, got)
		}
	}
}

// Remove refuses to delete through a mount it could not detach, and otherwise cleans a share left behind.
func TestRemoveLeftoverShare(t *testing.T) {
	requireRoot(t)
	dir := filepath.Join(t.TempDir(), "share")
	s, err := New(dir)
	if err != nil {
		t.Fatal(err)
	}
	rootfs, _, _ := hostTree(t)
	if _, err := s.AddRootfs(context.Background(), "c8", rootfs, false); err != nil {
		t.Fatal(err)
	}
	// As if the Kiln process that made the share had died: only the directory is known.
	if err := Remove(dir); err != nil {
		t.Fatal(err)
	}
	checkGone(t, s.Dir())
	if got := read(t, filepath.Join(rootfs, "etc/hostname")); got != "c1" {
		t.Errorf("host rootfs damaged: %q", got)
	}
	// removeTree never deletes through a mount point.
	d := t.TempDir()
	m := filepath.Join(d, "m")
	if err := os.Mkdir(m, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount(rootfs, m, "", unix.MS_BIND, ""); err != nil {
		t.Fatal(err)
	}
	defer unix.Unmount(m, unix.MNT_DETACH)
	if err := mounttree.RemoveTree(d); err == nil {
		t.Error("removeTree went through a mount point")
	}
	if got := read(t, filepath.Join(rootfs, "etc/hostname")); got != "c1" {
		t.Errorf("host rootfs damaged by removeTree: %q", got)
	}
}

// TestReadonlyBindSubmounts: an OCI "ro" bind makes the source's own mount read-only and leaves a mount below
// it writable, as runc does; "rro" makes both read-only.
func TestReadonlyBindSubmounts(t *testing.T) {
	requireRoot(t)
	s := newTestShare(t)
	ctx := context.Background()
	src := t.TempDir()
	sub := filepath.Join(src, "tmpfs")
	if err := os.Mkdir(sub, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("tmpfs", sub, "tmpfs", 0, ""); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = unix.Unmount(sub, unix.MNT_DETACH) })
	for _, tc := range []struct {
		id     string
		opts   BindOptions
		subErr error
	}{
		{"ro", BindOptions{Readonly: true, Recursive: true}, nil},
		{"rro", BindOptions{Readonly: true, RecursiveReadonly: true, Recursive: true}, unix.EROFS},
	} {
		t.Run(tc.id, func(t *testing.T) {
			guest, err := s.AddBindSource(ctx, tc.id, Source{Path: src}, tc.opts)
			if err != nil {
				t.Fatal(err)
			}
			host := filepath.Join(s.ExportDir(), strings.TrimPrefix(guest, GuestDir+"/"))
			if err := os.WriteFile(filepath.Join(host, "top"), nil, 0o644); !errors.Is(err, unix.EROFS) {
				t.Errorf("write to the read-only top mount: %v, want EROFS", err)
			}
			err = os.WriteFile(filepath.Join(host, "tmpfs", "f-"+tc.id), nil, 0o644)
			if tc.subErr == nil && err != nil || tc.subErr != nil && !errors.Is(err, tc.subErr) {
				t.Errorf("write below it: %v, want %v", err, tc.subErr)
			}
		})
	}
}

// A guest that writes to a directory above an exported tmpfs can swap that directory for a symlink between the
// listing of the share's mounts and their sizing: the size is the listed mount's, never that of a host tmpfs the
// symlink points at (its size would have been added to the VM's memory limit).
func TestTmpfsSizesNeverFollowASwappedDirectory(t *testing.T) {
	requireRoot(t)
	s := newTestShare(t)
	base := t.TempDir()
	var st unix.Statfs_t
	if err := unix.Statfs(base, &st); err != nil {
		t.Fatal(err)
	}
	if st.Type == unix.TMPFS_MAGIC {
		t.Skipf("the test's directories are on a tmpfs here (%s)", base)
	}
	export, victim := filepath.Join(base, "export"), filepath.Join(base, "victim")
	for _, m := range []struct{ dir, size string }{{filepath.Join(export, "mid", "below"), "2m"}, {filepath.Join(victim, "below"), "16m"}} {
		if err := os.MkdirAll(m.dir, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := unix.Mount("tmpfs", m.dir, "tmpfs", 0, "size="+m.size); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = unix.Unmount(m.dir, unix.MNT_DETACH) })
	}
	t.Cleanup(func() { _ = unix.Unmount(filepath.Join(export, "mid2", "below"), unix.MNT_DETACH) })
	if _, err := s.AddBindSource(context.Background(), "c1", Source{Path: export}, BindOptions{Recursive: true}); err != nil {
		t.Fatal(err)
	}
	infos, err := mountinfo.GetMounts(func(m *mountinfo.Info) (bool, bool) {
		return m.FSType != "tmpfs" || !mounttree.Under(m.Mountpoint, s.mounts) || m.Mountpoint == s.mounts, false
	})
	if err != nil || len(infos) != 1 {
		t.Fatalf("the share's tmpfs mounts: %v, %v; want the exported one", infos, err)
	}
	// The guest's swap, in the exported directory, between the listing and the sizing.
	if err := os.Rename(filepath.Join(export, "mid"), filepath.Join(export, "mid2")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(victim, filepath.Join(export, "mid")); err != nil {
		t.Fatal(err)
	}
	s.mu.Lock()
	sizes, err := s.tmpfsSizesLocked(infos)
	s.mu.Unlock()
	for _, size := range sizes {
		if size == 16<<20 {
			t.Errorf("sizes %v: the host tmpfs the swapped directory points at was counted", sizes)
		}
	}
	if err != nil {
		t.Error(err)
	}
}

// Tmpfs lists each tmpfs the share exports writable once, whatever directory of it is bound and however often,
// the mounts below an rbind's source included, and no read-only export or other file system.
func TestTmpfs(t *testing.T) {
	requireRoot(t)
	s := newTestShare(t)
	ctx := context.Background()
	base := t.TempDir()
	var st unix.Statfs_t
	if err := unix.Statfs(base, &st); err != nil {
		t.Fatal(err)
	}
	if st.Type == unix.TMPFS_MAGIC {
		t.Skipf("the test's directories are on a tmpfs here (%s): no directory to bind is on another file system", base)
	}
	tmpfs := func(dir, size string) string {
		t.Helper()
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := unix.Mount("tmpfs", dir, "tmpfs", 0, "size="+size); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = unix.Unmount(dir, unix.MNT_DETACH) })
		return dir
	}
	rw, ro := tmpfs(filepath.Join(base, "rw"), "8m"), tmpfs(filepath.Join(base, "ro"), "4m")
	disk := filepath.Join(base, "disk")
	tmpfs(filepath.Join(disk, "below"), "2m")
	if err := os.Mkdir(filepath.Join(rw, "sub"), 0o755); err != nil {
		t.Fatal(err)
	}
	want := func(what string, n int64) {
		t.Helper()
		sizes, err := s.Tmpfs()
		var got int64
		for _, size := range sizes {
			got += size
		}
		if err != nil || got != n {
			t.Errorf("%s: Tmpfs = %v, %v; want %d bytes in all", what, sizes, err, n)
		}
	}
	want("nothing exported", 0)
	if _, err := s.AddBindSource(ctx, "c1", Source{Path: disk}, BindOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.AddBind(ctx, "c1", ro, true); err != nil {
		t.Fatal(err)
	}
	want("a disk directory (not recursive) and a read-only tmpfs", 0)
	if _, err := s.AddBindSource(ctx, "c3", Source{Path: disk}, BindOptions{Recursive: true}); err != nil {
		t.Fatal(err)
	}
	want("a tmpfs below an rbind's source", 2<<20)
	for _, b := range []struct{ id, src string }{{"c1", rw}, {"c2", filepath.Join(rw, "sub")}, {"c2", rw}} {
		if _, err := s.AddBind(ctx, b.id, b.src, false); err != nil {
			t.Fatal(err)
		}
	}
	want("one tmpfs bound three times, and the one below the rbind", 10<<20)
	for _, id := range []string{"c1", "c2", "c3"} {
		if err := s.RemoveContainer(ctx, id); err != nil {
			t.Fatal(err)
		}
	}
	want("everything removed", 0)
}
