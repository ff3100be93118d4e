package containerd

import (
	"os"
	"path/filepath"
	"slices"
	"testing"

	"golang.org/x/sys/unix"
)

// MountsUnder finds nested mounts (a name with a space too) deepest first, and unmountUnder removes them all.
func TestMountsUnder(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("mounting needs root")
	}
	dir := t.TempDir()
	outer := filepath.Join(dir, "outer")
	inner := filepath.Join(outer, "in ner")
	for _, p := range []string{outer, inner} {
		if err := os.MkdirAll(p, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := unix.Mount("tmpfs", p, "tmpfs", 0, "size=1m"); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = unix.Unmount(p, unix.MNT_DETACH) })
	}
	got, err := MountsUnder(dir)
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{inner, outer}; !slices.Equal(got, want) {
		t.Errorf("MountsUnder(%s) = %q, want %q", dir, got, want)
	}
	if got, _ := MountsUnder(dir + "x"); len(got) != 0 {
		t.Errorf("MountsUnder of a sibling prefix found %q", got)
	}
	if err := unmountUnder(dir); err != nil {
		t.Fatal(err)
	}
	if got, _ := MountsUnder(dir); len(got) != 0 {
		t.Errorf("mounts left after unmountUnder: %q", got)
	}
}
