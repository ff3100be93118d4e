package share

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
)

// escapeTree builds, in a fresh directory:
//
//	root/dir/file
//	root/dir/back -> ../dir/file       relative, stays beneath root
//	root/in -> dir                     relative, stays
//	root/abs -> /etc                   absolute: escapes
//	root/absin -> <root>/dir           absolute, even though it points inside: escapes
//	root/up -> ../outside              climbs above root: escapes
//	root/dir/deep -> ../../outside     climbs above root from a subdirectory: escapes
//	root/loop -> loop
//	outside/secret
func escapeTree(t *testing.T) (root, outside string) {
	t.Helper()
	base := t.TempDir()
	root = filepath.Join(base, "root")
	outside = filepath.Join(base, "outside")
	for _, d := range []string{filepath.Join(root, "dir"), outside} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for _, f := range []string{filepath.Join(root, "dir", "file"), filepath.Join(outside, "secret")} {
		if err := os.WriteFile(f, []byte("x"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	links := map[string]string{
		"dir/back": "../dir/file",
		"in":       "dir",
		"abs":      "/etc",
		"absin":    filepath.Join(root, "dir"),
		"up":       "../outside",
		"dir/deep": "../../outside",
		"loop":     "loop",
	}
	for name, target := range links {
		if err := os.Symlink(target, filepath.Join(root, name)); err != nil {
			t.Fatal(err)
		}
	}
	return root, outside
}

func TestSourceResolution(t *testing.T) {
	root, outside := escapeTree(t)
	tests := []struct {
		name       string
		src        Source
		want       string // resolved path; empty when an error is expected
		wantEscape bool
	}{
		{"plain file", Source{Root: root, Path: "dir/file"}, filepath.Join(root, "dir/file"), false},
		{"absolute path under root", Source{Root: root, Path: filepath.Join(root, "dir/file")}, filepath.Join(root, "dir/file"), false},
		{"root itself", Source{Root: root, Path: root}, root, false},
		{"relative symlink to a sibling", Source{Root: root, Path: "dir/back"}, filepath.Join(root, "dir/file"), false},
		{"relative symlink as a directory", Source{Root: root, Path: "in/file"}, filepath.Join(root, "dir/file"), false},
		{"dotdot that stays", Source{Root: root, Path: "dir/../dir/file"}, filepath.Join(root, "dir/file"), false},
		{"absolute symlink", Source{Root: root, Path: "abs/passwd"}, "", true},
		{"absolute symlink pointing inside", Source{Root: root, Path: "absin/file"}, "", true},
		{"symlink climbing out", Source{Root: root, Path: "up/secret"}, "", true},
		{"symlink climbing out from a subdirectory", Source{Root: root, Path: "dir/deep"}, "", true},
		{"dotdot climbing out", Source{Root: root, Path: "../outside/secret"}, "", true},
		{"absolute path outside root", Source{Root: root, Path: filepath.Join(outside, "secret")}, "", true},
		{"unbounded root follows absolute symlinks", Source{Path: filepath.Join(root, "up/secret")}, filepath.Join(outside, "secret"), false},
		{"missing file is no escape", Source{Root: root, Path: "dir/missing"}, "", false},
		{"symlink loop is no escape", Source{Root: root, Path: "loop"}, "", false},
		{"magic link is refused", Source{Root: "/proc/self", Path: "exe"}, "", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f, got, err := tt.src.open()
			if err == nil {
				f.Close()
			}
			if tt.want == "" {
				if err == nil {
					t.Fatalf("resolved to %s, want an error", got)
				}
				if errors.Is(err, ErrEscape) != tt.wantEscape {
					t.Fatalf("error %v: ErrEscape = %v, want %v", err, errors.Is(err, ErrEscape), tt.wantEscape)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got != tt.want {
				t.Errorf("resolved to %s, want %s", got, tt.want)
			}
		})
	}
}

// boundLocked narrows a source's root to the first writable export its resolution reaches, comparing real
// paths. The tree, in a fresh directory:
//
//	bundles/a/rootfs/etc, bundles/a/rootfs2   rootfs is exported read-write
//	vols/data/deeper                          data and deeper are exported read-write
//	etc/hosts
//	link -> vols                              relative host symlink
//	abslink -> <base>/vols                    absolute host symlink
//	into -> <base>/vols/data/deeper           absolute host symlink into an export
func TestBoundByWritableExport(t *testing.T) {
	base := t.TempDir()
	for _, d := range []string{"bundles/a/rootfs/etc", "bundles/a/rootfs2", "vols/data/deeper", "etc"} {
		if err := os.MkdirAll(filepath.Join(base, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(base, "etc/hosts"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	for name, target := range map[string]string{
		"link":    "vols",
		"abslink": filepath.Join(base, "vols"),
		"into":    filepath.Join(base, "vols/data/deeper"),
	} {
		if err := os.Symlink(target, filepath.Join(base, name)); err != nil {
			t.Fatal(err)
		}
	}
	b := func(p string) string { return filepath.Join(base, p) }
	s := &Share{writable: []string{b("bundles/a/rootfs"), b("vols/data"), b("vols/data/deeper")}}
	tests := []struct {
		name       string
		src        Source
		want       Source
		wantEscape bool
	}{
		{"outside every export", Source{Path: b("etc/hosts")}, Source{Path: b("etc/hosts")}, false},
		{"inside an export", Source{Path: b("bundles/a/rootfs/etc")}, Source{Root: b("bundles/a/rootfs"), Path: "etc"}, false},
		{"the export itself", Source{Path: b("bundles/a/rootfs")}, Source{Root: b("bundles/a/rootfs"), Path: "."}, false},
		{"a sibling with a longer name", Source{Path: b("bundles/a/rootfs2")}, Source{Path: b("bundles/a/rootfs2")}, false},
		{"first export on the way", Source{Path: b("vols/data/deeper/x")}, Source{Root: b("vols/data"), Path: "deeper/x"}, false},
		{"relative to a root", Source{Root: b("vols"), Path: "data/y"}, Source{Root: b("vols/data"), Path: "y"}, false},
		{"root inside an export", Source{Root: b("vols/data/deeper/x"), Path: "z"}, Source{Root: b("vols/data"), Path: "deeper/x/z"}, false},
		{"through a relative host symlink", Source{Path: b("link/data/y")}, Source{Root: b("vols/data"), Path: "y"}, false},
		{"through an absolute host symlink", Source{Path: b("abslink/data/y")}, Source{Root: b("vols/data"), Path: "y"}, false},
		{"host symlink into an export", Source{Path: b("into/x")}, Source{Root: b("vols/data"), Path: "deeper/x"}, false},
		{"dotdot back into an export (absolute paths are cleaned, as open does)", Source{Path: b("etc") + "/../vols/data/../data/y"}, Source{Root: b("vols/data"), Path: "y"}, false},
		{"relative symlink beneath a root", Source{Root: base, Path: "link/data"}, Source{Root: b("vols/data"), Path: "."}, false},
		{"absolute symlink beneath a root", Source{Root: base, Path: "abslink/data"}, Source{}, true},
		{"dotdot above a root", Source{Root: b("bundles"), Path: "../vols/data"}, Source{}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := s.boundLocked(tt.src)
			if tt.wantEscape {
				if !errors.Is(err, ErrEscape) {
					t.Fatalf("boundLocked(%+v) = %+v, %v; want ErrEscape", tt.src, got, err)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Errorf("boundLocked(%+v) = %+v, %v; want %+v", tt.src, got, err, tt.want)
			}
		})
	}
}
