package mounttree

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"
)

// RemoveTree stops at a mount point instead of deleting what is mounted there; after UnmountUnder it removes
// the whole tree and the mounted files are untouched.
func TestRemoveTreeNeverCrossesAMount(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to mount")
	}
	tree := filepath.Join(t.TempDir(), "tree")
	mp := filepath.Join(tree, "a", "b")
	if err := os.MkdirAll(mp, 0o755); err != nil {
		t.Fatal(err)
	}
	host := t.TempDir()
	file := filepath.Join(host, "f")
	if err := os.WriteFile(file, []byte("keep"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount(host, mp, "", unix.MS_BIND, ""); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = unix.Unmount(mp, unix.MNT_DETACH) })
	if pts, err := Points(tree); err != nil || len(pts) != 1 || pts[0] != mp {
		t.Fatalf("Points = %v, %v; want [%s]", pts, err, mp)
	}
	if err := RemoveTree(tree); err == nil {
		t.Fatal("RemoveTree went through a mount point")
	}
	if _, err := os.Stat(file); err != nil {
		t.Fatalf("RemoveTree deleted a mounted file: %v", err)
	}
	if err := UnmountUnder(tree); err != nil {
		t.Fatal(err)
	}
	if err := RemoveTree(tree); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(tree); !os.IsNotExist(err) {
		t.Errorf("tree still there: %v", err)
	}
	if b, err := os.ReadFile(file); err != nil || string(b) != "keep" {
		t.Errorf("the mounted file is %q, %v; want it untouched", b, err)
	}
	if err := RemoveTree(tree); err != nil {
		t.Errorf("RemoveTree of a missing tree: %v", err)
	}
}

// Two removers of the same tree (a dead shim's `delete` and a new pod's sweep of the same VM state) both succeed:
// what one removed, the other finds gone.
func TestRemoveTreeBesideAnotherRemover(t *testing.T) {
	for round := range 20 {
		dir := filepath.Join(t.TempDir(), "state")
		for i := range 50 {
			sub := filepath.Join(dir, fmt.Sprint("d", i%5))
			if err := os.MkdirAll(sub, 0o700); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(sub, fmt.Sprint("f", i)), nil, 0o600); err != nil {
				t.Fatal(err)
			}
		}
		errs := make(chan error, 2)
		for range 2 {
			go func() { errs <- RemoveTree(dir) }()
		}
		for range 2 {
			if err := <-errs; err != nil {
				t.Fatalf("round %d: RemoveTree beside another: %v", round, err)
			}
		}
		if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("round %d: %s still there (%v)", round, dir, err)
		}
	}
}

// A mount listed under a directory that is replaced by a symlink before its unmount (a running guest renames
// directories of a writable export at will) is not unmounted through the symlink: the mount it now reaches lies
// outside the tree. The moved mount is found again under its new path and unmounted there.
func TestUnmountNeverFollowsASwappedDirectory(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to mount")
	}
	tree, victim := filepath.Join(t.TempDir(), "tree"), t.TempDir()
	sub, victimSub := filepath.Join(tree, "a", "sub"), filepath.Join(victim, "sub")
	for _, d := range []string{sub, victimSub} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := unix.Mount("tmpfs", d, "tmpfs", 0, "size=1m"); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = unix.Unmount(d, unix.MNT_DETACH) })
	}
	t.Cleanup(func() { _ = unix.Unmount(filepath.Join(tree, "b", "sub"), unix.MNT_DETACH) }) // where the swap moves it
	infos, err := mountinfo.GetMounts(mountinfo.SingleEntryFilter(sub))
	if err != nil || len(infos) != 1 {
		t.Fatalf("mountinfo of %s: %v, %v", sub, infos, err)
	}
	// The swap, between the listing and the unmount.
	if err := os.Rename(filepath.Join(tree, "a"), filepath.Join(tree, "b")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(victim, filepath.Join(tree, "a")); err != nil {
		t.Fatal(err)
	}
	if err := unmountRound(tree, infos); err != nil {
		t.Fatal(err)
	}
	if mounted, err := mountinfo.Mounted(victimSub); err != nil || !mounted {
		t.Fatalf("the mount outside the tree was unmounted through the swapped directory (mounted %v, %v)", mounted, err)
	}
	if err := UnmountUnder(tree); err != nil {
		t.Fatal(err)
	}
	if pts, err := Points(tree); err != nil || len(pts) != 0 {
		t.Errorf("mounts left under the tree: %v, %v", pts, err)
	}
	if mounted, _ := mountinfo.Mounted(victimSub); !mounted {
		t.Error("UnmountUnder took the mount outside the tree")
	}
}
