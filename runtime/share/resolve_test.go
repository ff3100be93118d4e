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

func TestBoundByWritableExport(t *testing.T) {
	s := &Share{containers: map[string]*container{
		"a": {writable: []string{"/bundles/a/rootfs"}},
		"b": {writable: []string{"/vols/data", "/vols/data/deeper"}},
	}}
	tests := []struct {
		src  Source
		want Source
	}{
		{Source{Path: "/etc/hosts"}, Source{Path: "/etc/hosts"}},
		{Source{Path: "/bundles/a/rootfs/etc"}, Source{Root: "/bundles/a/rootfs", Path: "/bundles/a/rootfs/etc"}},
		{Source{Path: "/bundles/a/rootfs2"}, Source{Path: "/bundles/a/rootfs2"}},
		{Source{Path: "/vols/data/deeper/x"}, Source{Root: "/vols/data/deeper", Path: "/vols/data/deeper/x"}},
		{Source{Root: "/vols", Path: "data/y"}, Source{Root: "/vols/data", Path: "/vols/data/y"}},
		{Source{Root: "/vols/data/deeper/x", Path: "z"}, Source{Root: "/vols/data/deeper/x", Path: "z"}},
	}
	for _, tt := range tests {
		if got := s.boundLocked(tt.src); got != tt.want {
			t.Errorf("boundLocked(%+v) = %+v, want %+v", tt.src, got, tt.want)
		}
	}
}
