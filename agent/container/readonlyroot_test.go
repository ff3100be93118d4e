package container

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"
)

func TestNewReadOnlyRootRefusesIDsThatAreNoDirectoryName(t *testing.T) {
	for _, id := range []string{"", ".", "..", "a/b", "../x", "a\x00b"} {
		if _, err := newReadOnlyRoot("/run/roots", id, "/shared/x/rootfs"); err == nil {
			t.Errorf("newReadOnlyRoot(%q): no error", id)
		}
	}
	r, err := newReadOnlyRoot("/run/roots", "c-1.2", "/shared/c-1.2/rootfs")
	if err != nil {
		t.Fatal(err)
	}
	if r.root() != "/run/roots/c-1.2/root" {
		t.Errorf("root() = %s", r.root())
	}
}

// The layer takes what is made in the root; the lower directory, which stands for the read-only export, is left
// as it was, and removing the layer leaves no mount and no directory. The root keeps the export's owner and mode
// (a user namespace's mapped root owns it), and the way to it lets anyone pass. The lower path holds the
// characters overlayfs splits its options on.
func TestReadOnlyRootLayersAboveTheExport(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("mounting needs root")
	}
	lower := filepath.Join(t.TempDir(), "a,b:c")
	if err := os.MkdirAll(filepath.Join(lower, "etc"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(lower, "etc", "passwd"), []byte("root:x:0:0::/:/bin/sh\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(lower, 200000, 300000); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(lower, 0o750); err != nil {
		t.Fatal(err)
	}
	roots := filepath.Join(t.TempDir(), "roots")
	r, err := newReadOnlyRoot(roots, "c1", lower)
	if err != nil {
		t.Fatal(err)
	}
	if err := r.mount(); err != nil {
		t.Fatal(err)
	}
	removed := false
	t.Cleanup(func() {
		if !removed {
			_ = r.remove()
		}
	})
	var st unix.Stat_t
	if err := unix.Stat(r.root(), &st); err != nil {
		t.Fatal(err)
	}
	if st.Uid != 200000 || st.Gid != 300000 || st.Mode&0o7777 != 0o750 {
		t.Errorf("the layered root is %d:%d %o, want the export's 200000:300000 750", st.Uid, st.Gid, st.Mode&0o7777)
	}
	for _, d := range []string{roots, r.dir} {
		if fi, err := os.Stat(d); err != nil || fi.Mode().Perm()&0o111 != 0o111 {
			t.Errorf("%s: %v, %v: want anyone to pass through", d, fi.Mode(), err)
		}
	}
	if b, err := os.ReadFile(filepath.Join(r.root(), "etc", "passwd")); err != nil || !strings.HasPrefix(string(b), "root:") {
		t.Fatalf("the export's file through the layer: %q, %v", b, err)
	}
	for _, d := range []string{"proc", "etc/mnt"} {
		if err := os.Mkdir(filepath.Join(r.root(), d), 0o755); err != nil {
			t.Fatalf("make a mount point: %v", err)
		}
		if _, err := os.Lstat(filepath.Join(lower, d)); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("%s reached the export: %v", d, err)
		}
	}
	if err := r.remove(); err != nil {
		t.Fatal(err)
	}
	removed = true
	if entries, err := os.ReadDir(roots); err != nil || len(entries) != 0 {
		t.Errorf("left in the roots directory: %v, %v", entries, err)
	}
	if mounted(t, roots) {
		t.Error("a mount is left under the roots directory")
	}
}

// A failed layering (here a missing export) leaves nothing.
func TestReadOnlyRootLeavesNothingWhenItFails(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("mounting needs root")
	}
	roots := t.TempDir()
	r, err := newReadOnlyRoot(roots, "c1", filepath.Join(t.TempDir(), "missing"))
	if err != nil {
		t.Fatal(err)
	}
	if err := r.mount(); err == nil || !strings.Contains(err.Error(), "missing") {
		_ = r.remove()
		t.Fatalf("mount over a missing export: %v, want an error naming it", err)
	}
	if entries, err := os.ReadDir(roots); err != nil || len(entries) != 0 {
		t.Errorf("left in the roots directory: %v, %v", entries, err)
	}
	if mounted(t, roots) {
		t.Error("a mount is left under the roots directory")
	}
}

// mounted says whether anything is mounted at or below dir.
func mounted(t *testing.T, dir string) bool {
	t.Helper()
	mounts, err := mountinfo.GetMounts(mountinfo.PrefixFilter(dir))
	if err != nil {
		t.Fatal(err)
	}
	return len(mounts) > 0
}
