package bundle

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
)

func TestLoad(t *testing.T) {
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
		{"no process", `{"root":{"path":"rootfs"}}`, true, "has no process"},
		{"root is a file", `{"process":{"args":["sh"]},"root":{"path":"config.json"}}`, true, "not a directory"},
		{"unknown namespace type", `{"process":{"args":["sh"]},"root":{"path":"rootfs"},"linux":{"namespaces":[{"type":"pid"},{"type":"bogus"}]}}`,
			true, `linux.namespaces[1]: unknown namespace type "bogus"`},
		{"negative memory limit", `{"process":{"args":["sh"]},"root":{"path":"rootfs"},"linux":{"resources":{"memory":{"limit":-5}}}}`,
			true, "linux.resources.memory.limit = -5"},
		{"negative CPU quota", `{"process":{"args":["sh"]},"root":{"path":"rootfs"},"linux":{"resources":{"cpu":{"quota":-2}}}}`,
			true, "linux.resources.cpu.quota = -2"},
		{"negative pids limit", `{"process":{"args":["sh"]},"root":{"path":"rootfs"},"linux":{"resources":{"pids":{"limit":-7}}}}`,
			true, "linux.resources.pids.limit = -7"},
		{"no limit is -1", `{"process":{"args":["sh"]},"root":{"path":"rootfs","readonly":true},"linux":{"resources":{"memory":{"limit":-1},"cpu":{"quota":-1}}}}`,
			true, ""},
		{"larger than the agent API carries", `{"process":{"args":["sh"],"env":["X=` + strings.Repeat("x", MaxConfigSize) + `"]},"root":{"path":"rootfs"}}`,
			true, "config.json is larger than 4128768 bytes"},
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
			b, err := Load(dir)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("Load = %v, want an error about %q", err, tc.wantErr)
				}
				if !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), dir) {
					t.Errorf("Load = %v, want InvalidArgument naming the bundle", err)
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

func TestLoadMissingConfig(t *testing.T) {
	_, err := Load(t.TempDir())
	if !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), "config.json") {
		t.Fatalf("Load of an empty dir = %v, want InvalidArgument about config.json", err)
	}
}

// The shim's start command reads the annotations of a bundle it knows nothing of yet: a config.json bigger than
// the agent API carries is refused there too, without reading it whole.
func TestAnnotationsRefusesOversizedConfig(t *testing.T) {
	dir := t.TempDir()
	big := `{"annotations":{"a":"` + strings.Repeat("x", 2*MaxConfigSize) + `"}}`
	if err := os.WriteFile(filepath.Join(dir, "config.json"), []byte(big), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := Annotations(dir); !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), "config.json is larger than") {
		t.Fatalf("Annotations = %v, want InvalidArgument about the size of config.json", err)
	}
}
