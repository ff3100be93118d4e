package containerd

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestKeepLogs: a failed test's containerd log and the VM consoles under the Kiln state directories are copied
// out, and nothing else is.
func TestKeepLogs(t *testing.T) {
	dir := t.TempDir()
	d := &Daemon{Dir: dir, LogPath: filepath.Join(dir, "containerd.log")}
	other := filepath.Join(t.TempDir(), "kiln")
	files := map[string]string{
		d.LogPath: "containerd says",
		filepath.Join(d.StateDir(), "vm1", "console.log"):   "guest one",
		filepath.Join(d.StateDir(), "vm1", "console.log.1"): "guest one, before",
		filepath.Join(d.StateDir(), "vm1", "qmp.sock"):      "not a log",
		filepath.Join(other, "vm2", "console.log"):          "guest two",
	}
	for p, body := range files {
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	kept, err := d.KeepLogs("TestSome/sub case", other)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(kept) })
	if !strings.HasPrefix(filepath.Base(kept), "kiln-failed-TestSome_sub_case-") {
		t.Errorf("kept in %s, want a directory named after the test", kept)
	}
	want := map[string]string{
		"containerd.log":         "containerd says",
		"kiln/vm1/console.log":   "guest one",
		"kiln/vm1/console.log.1": "guest one, before",
		"kiln/vm2/console.log":   "guest two",
	}
	got := map[string]string{}
	err = filepath.WalkDir(kept, func(p string, e os.DirEntry, err error) error {
		if err != nil || e.IsDir() {
			return err
		}
		b, err := os.ReadFile(p)
		rel, _ := filepath.Rel(kept, p)
		got[rel] = string(b)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(want) {
		t.Errorf("kept %v, want %v", got, want)
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("kept %s: %q, want %q", k, got[k], v)
		}
	}
}
