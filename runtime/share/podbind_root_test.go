package share

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/kiln-runtime/kiln/mounttree"
)

// The pod's containers that bind one source get one export of it, so that in the guest they share its inodes;
// a read-only request takes a read-write export, never the other way round; other options make another export;
// an export goes when the last container using it does.
func TestPodBindsAreShared(t *testing.T) {
	requireRoot(t)
	s := newTestShare(t)
	ctx := context.Background()
	vol, roVol := t.TempDir(), t.TempDir()
	if err := os.WriteFile(filepath.Join(vol, "data"), []byte("shared"), 0o644); err != nil {
		t.Fatal(err)
	}
	bind := func(id, src string, opts BindOptions) string {
		t.Helper()
		g, err := s.AddBindSource(ctx, id, Source{Path: src}, opts)
		if err != nil {
			t.Fatal(err)
		}
		return g
	}
	host := func(guest string) string {
		return filepath.Join(s.ExportDir(), strings.TrimPrefix(guest, GuestDir+"/"))
	}

	rw := bind("c1", vol, BindOptions{Recursive: true})
	if g := bind("c2", vol, BindOptions{Recursive: true}); g != rw {
		t.Errorf("a second container's bind of the same source: %s, want the first's %s", g, rw)
	}
	if g := bind("c3", vol, BindOptions{Recursive: true, Readonly: true}); g != rw {
		t.Errorf("a read-only bind of a source exported read-write: %s, want that export %s", g, rw)
	}
	if g := bind("c3", vol, BindOptions{}); g == rw {
		t.Error("a bind with other options shares the export")
	}
	ro := bind("c1", roVol, BindOptions{Readonly: true})
	rwLater := bind("c2", roVol, BindOptions{})
	if rwLater == ro {
		t.Error("a read-write bind took a read-only export")
	}
	if err := os.WriteFile(filepath.Join(host(ro), "x"), nil, 0o644); !errors.Is(err, unix.EROFS) {
		t.Errorf("write through the read-only export: %v, want EROFS", err)
	}
	if g := bind("c3", roVol, BindOptions{Readonly: true}); g != rwLater {
		t.Errorf("a read-only bind once a read-write export exists: %s, want it (%s), which a writer shares", g, rwLater)
	}
	// The same directory reached through a read-only host mount of it is another source: its export must not
	// be one that writes.
	roMount := t.TempDir()
	if err := unix.Mount(vol, roMount, "", unix.MS_BIND, ""); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = unix.Unmount(roMount, unix.MNT_DETACH) })
	if err := unix.Mount("", roMount, "", unix.MS_REMOUNT|unix.MS_BIND|unix.MS_RDONLY, ""); err != nil {
		t.Fatal(err)
	}
	viaRO := bind("c3", roMount, BindOptions{Recursive: true})
	if viaRO == rw {
		t.Error("a source reached through a read-only host mount took the export of a writable path to it")
	}
	if err := os.WriteFile(filepath.Join(host(viaRO), "x"), nil, 0o644); !errors.Is(err, unix.EROFS) {
		t.Errorf("write through the export of a read-only host mount: %v, want EROFS", err)
	}

	for _, id := range []string{"c1", "c3"} {
		if err := s.RemoveContainer(ctx, id); err != nil {
			t.Fatal(err)
		}
	}
	if got := read(t, filepath.Join(host(rw), "data")); got != "shared" {
		t.Errorf("the export c2 still uses, after the others went: %q", got)
	}
	if _, err := os.Stat(filepath.Dir(filepath.Join(s.mounts, strings.TrimPrefix(ro, GuestDir+"/")))); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the export only c1 used is still there: %v", err)
	}
	if err := s.RemoveContainer(ctx, "c2"); err != nil {
		t.Fatal(err)
	}
	if mps, err := mounttree.Points(filepath.Join(s.mounts, podBinds)); err != nil || len(mps) > 0 {
		t.Errorf("mounts left under %s once every container went: %v, %v", podBinds, mps, err)
	}
	if entries, _ := os.ReadDir(filepath.Join(s.mounts, podBinds)); len(entries) > 0 {
		t.Errorf("exports left once every container went: %v", entries)
	}
}
