package container

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestLoadBundle(t *testing.T) {
	cases := []struct {
		name    string
		config  string
		mkRoot  bool
		wantErr string
	}{
		{"ok", `{"ociVersion":"1.2.0","process":{"args":["sh"],"cwd":"/"},"root":{"path":"rootfs","readonly":true}}`, true, ""},
		{"no root dir", `{"process":{"args":["sh"]},"root":{"path":"rootfs"}}`, false, "root"},
		{"no args", `{"process":{"args":[]},"root":{"path":"rootfs"}}`, true, "process.args"},
		{"no root", `{"process":{"args":["sh"]}}`, true, "root.path"},
		{"bad json", `{`, true, "parse config.json"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			if err := os.WriteFile(filepath.Join(dir, "config.json"), []byte(tc.config), 0o644); err != nil {
				t.Fatal(err)
			}
			if tc.mkRoot {
				if err := os.Mkdir(filepath.Join(dir, "rootfs"), 0o755); err != nil {
					t.Fatal(err)
				}
			}
			b, err := LoadBundle(dir)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("LoadBundle = %v, want an error about %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if b.Rootfs != filepath.Join(dir, "rootfs") || !b.Spec.Root.Readonly || b.Spec.Process.Args[0] != "sh" {
				t.Errorf("bundle %+v", b)
			}
		})
	}
}
