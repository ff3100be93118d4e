package qemu

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// A template directory is trusted only when no one but root can change what it holds: a part another user owns
// or may write (unless sticky), as written or where a link leads, is refused, naming it.
func TestTrustedDir(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to give files to another user")
	}
	const nobody = 65534
	for _, tc := range []struct {
		name  string
		setup func(t *testing.T, root string) string // returns the template directory
		want  string                                 // "" when trusted, else a part of the error
	}{
		{"made by root", func(t *testing.T, root string) string { return mkdir(t, root, "kiln", 0o711, 0) + "/templates" }, ""},
		{"not made yet", func(t *testing.T, root string) string { return root + "/kiln/templates" }, ""},
		{"sticky and writable by all", func(t *testing.T, root string) string {
			return mkdir(t, mkdir(t, root, "shm", 0o1777, 0), "kiln", 0o711, 0) + "/templates"
		}, ""},
		{"a part another user made", func(t *testing.T, root string) string {
			return mkdir(t, mkdir(t, root, "shm", 0o1777, 0), "kiln", 0o755, nobody) + "/templates"
		}, "belongs to uid 65534"},
		{"the directory itself another user's", func(t *testing.T, root string) string {
			return mkdir(t, mkdir(t, root, "kiln", 0o711, 0), "templates", 0o700, nobody)
		}, "belongs to uid 65534"},
		{"writable by its group", func(t *testing.T, root string) string { return mkdir(t, root, "kiln", 0o775, 0) + "/templates" }, "writable by others"},
		{"itself sticky and writable by all, as /dev/shm", func(t *testing.T, root string) string { return mkdir(t, root, "shm", 0o1777, 0) }, "writable by others"},
		{"a link to a directory sticky and writable by all", func(t *testing.T, root string) string {
			link := filepath.Join(root, "templates")
			if err := os.Symlink(mkdir(t, root, "shm", 0o1777, 0), link); err != nil {
				t.Fatal(err)
			}
			return link
		}, "writable by others"},
		{"a link another user made", func(t *testing.T, root string) string {
			shm := mkdir(t, root, "shm", 0o1777, 0)
			link := filepath.Join(shm, "kiln")
			if err := os.Symlink(mkdir(t, root, "elsewhere", 0o711, 0), link); err != nil {
				t.Fatal(err)
			}
			if err := os.Lchown(link, nobody, nobody); err != nil {
				t.Fatal(err)
			}
			return link + "/templates"
		}, "belongs to uid 65534"},
		{"a link of root's to another user's directory", func(t *testing.T, root string) string {
			link := filepath.Join(root, "kiln")
			if err := os.Symlink(mkdir(t, root, "theirs", 0o755, nobody), link); err != nil {
				t.Fatal(err)
			}
			return link + "/templates"
		}, "belongs to uid 65534"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			root := mkdir(t, t.TempDir(), "root", 0o755, 0)
			dir := tc.setup(t, root)
			err := trustedDir(dir)
			if tc.want == "" {
				if err != nil {
					t.Fatalf("trustedDir(%s): %v", dir, err)
				}
				if why := TemplateDirUnusable(dir, func(string) (int64, error) { return 0x01021994, nil }); why != "" {
					t.Errorf("TemplateDirUnusable: %s", why)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("trustedDir(%s) = %v, want an error with %q", dir, err, tc.want)
			}
			if why := TemplateDirUnusable(dir, func(string) (int64, error) { return 0x01021994, nil }); !strings.Contains(why, tc.want) {
				t.Errorf("TemplateDirUnusable = %q, want it to say %q", why, tc.want)
			}
		})
	}
}

// mkdir makes parent/name with mode (the kernel's bits: 0o1777 is sticky) and owner uid.
func mkdir(t *testing.T, parent, name string, mode uint32, uid int) string {
	t.Helper()
	p := filepath.Join(parent, name)
	if err := os.Mkdir(p, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := unix.Chmod(p, mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(p, uid, uid); err != nil {
		t.Fatal(err)
	}
	return p
}
