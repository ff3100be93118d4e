package share

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// plantedVolume is a host volume reached through a host symlink (base/link -> base/real), in which the guest
// will plant a symlink to the host's /etc: base/real/vol/planted -> /etc. It also holds a host symlink that
// points into the volume (base/shortcut -> base/real/vol/planted) and one that climbs back to it
// (base/uplink -> real/../link/vol).
func plantedVolume(t *testing.T) (base string) {
	t.Helper()
	base = t.TempDir()
	if err := os.MkdirAll(filepath.Join(base, "real", "vol"), 0o755); err != nil {
		t.Fatal(err)
	}
	for link, target := range map[string]string{
		"link":     "real",
		"shortcut": filepath.Join(base, "real", "vol", "planted"),
		"uplink":   "real/../link/vol",
	} {
		if err := os.Symlink(target, filepath.Join(base, link)); err != nil {
			t.Fatal(err)
		}
	}
	return base
}

// A source that reaches a directory exported read-write is resolved beneath that directory however both are
// spelled: through a host symlink to the export or one of its parents, or through a host symlink pointing into
// it (issue 11, finding 4: the guard compared the names callers used, not the real paths, so a read-write
// bind named through a host symlink let a later bind follow a symlink the guest planted there).
func TestWritableExportBoundsSourcesWhateverTheirSpelling(t *testing.T) {
	requireRoot(t)
	for _, tc := range []struct {
		name     string
		writable string // how the read-write bind names the volume, relative to base
		later    string // how a later bind names the planted symlink, relative to base
	}{
		{"export through a symlink, source by real path", "link/vol", "real/vol/planted"},
		{"export by real path, source through a symlink", "real/vol", "link/vol/planted"},
		{"both through a symlink", "link/vol", "link/vol/planted"},
		{"source is a host symlink into the export", "real/vol", "shortcut"},
		{"source climbs back into the export", "link/vol", "uplink/planted"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			base := plantedVolume(t)
			s := newTestShare(t)
			ctx := context.Background()
			if _, err := s.AddBind(ctx, "c1", filepath.Join(base, tc.writable), false); err != nil {
				t.Fatal(err)
			}
			// What the guest does with a writable export.
			if err := os.Symlink("/etc", filepath.Join(base, "real", "vol", "planted")); err != nil {
				t.Fatal(err)
			}
			source := filepath.Join(base, tc.later)
			if g, err := s.AddBind(ctx, "c2", source, true); !errors.Is(err, ErrEscape) {
				t.Errorf("bind of %s: %v %v, want ErrEscape", source, g, err)
			}
			if rel, err := s.AddRootfs(ctx, "c3", source, true); !errors.Is(err, ErrEscape) {
				t.Errorf("rootfs %s: %v %v, want ErrEscape", source, rel, err)
			}
		})
	}
}

// Symlinks the guest planted in a read-write export outlive the container it was exported for, and so does the
// guest: later sources in that directory are resolved beneath it for as long as the share lives (issue 11,
// finding 4: RemoveContainer forgot the container's writable directories).
func TestWritableExportStaysBoundAfterItsContainerIsRemoved(t *testing.T) {
	requireRoot(t)
	base := plantedVolume(t)
	vol := filepath.Join(base, "real", "vol")
	s := newTestShare(t)
	ctx := context.Background()
	if _, err := s.AddBind(ctx, "c1", vol, false); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("/etc", filepath.Join(vol, "planted")); err != nil {
		t.Fatal(err)
	}
	if err := s.RemoveContainer(ctx, "c1"); err != nil {
		t.Fatal(err)
	}
	if g, err := s.AddBind(ctx, "c2", filepath.Join(vol, "planted"), true); !errors.Is(err, ErrEscape) {
		t.Errorf("bind through a symlink planted before RemoveContainer: %v %v, want ErrEscape", g, err)
	}
	// The volume itself, and what really is in it, can still be shared.
	write(t, filepath.Join(vol, "data"), "volume data")
	g, err := s.AddBind(ctx, "c2", filepath.Join(vol, "data"), true)
	if err != nil {
		t.Fatal(err)
	}
	if got := read(t, exported(s, g)); got != "volume data" {
		t.Errorf("export holds %q", got)
	}
	for _, name := range []string{vol, filepath.Join(base, "link", "vol")} {
		g, err := s.AddBind(ctx, "c3", name, false)
		if err != nil {
			t.Fatalf("the writable volume again, as %s: %v", name, err)
		}
		if got := read(t, filepath.Join(exported(s, g), "data")); got != "volume data" {
			t.Errorf("export of %s holds %q", name, got)
		}
	}
}

// What the guest can write through an export that is not itself read-write is bounded too: the host mounts
// below a plain "ro" rbind (which stay writable), and a container's root bound read-write from a snapshot
// directory (the native snapshotter's). A symlink the guest planted there sends no later source out.
func TestWritableBeneathOtherExportsIsBounded(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	t.Run("a host mount below a read-only rbind", func(t *testing.T) {
		base := plantedVolume(t)
		vol := filepath.Join(base, "real", "vol")
		sub := filepath.Join(vol, "sub")
		if err := os.Mkdir(sub, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := unix.Mount("tmpfs", sub, "tmpfs", 0, "size=1m"); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = unix.Unmount(sub, unix.MNT_DETACH) })
		s := newTestShare(t)
		if _, err := s.AddBindSource(ctx, "c1", Source{Path: vol}, BindOptions{Readonly: true, Recursive: true}); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink("/etc", filepath.Join(sub, "planted")); err != nil {
			t.Fatal(err)
		}
		if g, err := s.AddBind(ctx, "c2", filepath.Join(sub, "planted"), true); !errors.Is(err, ErrEscape) {
			t.Errorf("bind through a symlink in the writable mount below a ro rbind: %v %v, want ErrEscape", g, err)
		}
	})
	t.Run("a read-write bind root", func(t *testing.T) {
		base := plantedVolume(t)
		snapshot := filepath.Join(base, "real", "vol")
		s := newTestShare(t)
		if _, err := s.AddRootfsMounts(ctx, "c1", []Mount{{Type: "bind", Source: snapshot, Options: []string{"rbind", "rw"}}}, false); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink("/etc", filepath.Join(snapshot, "planted")); err != nil {
			t.Fatal(err)
		}
		if g, err := s.AddBind(ctx, "c2", filepath.Join(snapshot, "planted"), true); !errors.Is(err, ErrEscape) {
			t.Errorf("bind through a symlink in a read-write bind root: %v %v, want ErrEscape", g, err)
		}
	})
}
