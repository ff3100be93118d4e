package kernfs

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"testing"
)

// Write replaces what a file holds and never makes one.
func TestWrite(t *testing.T) {
	dir := t.TempDir()
	state := filepath.Join(dir, "state")
	if err := os.WriteFile(state, []byte("offline\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := Write(state, "online"); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(state); string(b) != "online" {
		t.Errorf("the file holds %q, want %q", b, "online")
	}
	missing := filepath.Join(dir, "probe")
	if err := Write(missing, "0x10000000"); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Write to a missing file: %v, want ErrNotExist", err)
	}
	if _, err := os.Stat(missing); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Write made %s", missing)
	}
}
