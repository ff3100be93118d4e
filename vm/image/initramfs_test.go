package image

import (
	"bytes"
	"compress/gzip"
	"io"
	"os"
	"path/filepath"
	"testing"
)

func fakeSpec() InitramfsSpec {
	return InitramfsSpec{Init: []byte("\x7fELF fake init"), MTime: 1234}
}

func TestBuildInitramfsLayout(t *testing.T) {
	archive, err := BuildInitramfs(fakeSpec())
	if err != nil {
		t.Fatal(err)
	}
	entries, err := ReadArchive(bytes.NewReader(archive))
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]Entry{}
	for _, e := range entries {
		got[e.Name] = e
	}
	dirs := []string{"dev", "proc", "sys", "run", "tmp"}
	for _, d := range dirs {
		if got[d].Mode&modeTypeMsk != ModeDir {
			t.Errorf("%s: mode %#o, want a directory", d, got[d].Mode)
		}
	}
	if c := got["dev/console"]; c.Mode != ModeCharDev|0o600 || c.RdevMajor != 5 || c.RdevMinor != 1 {
		t.Errorf("dev/console = %+v, want char device 5,1", c)
	}
	if i := got["init"]; i.Mode != ModeRegular|0o755 || string(i.Data) != "\x7fELF fake init" {
		t.Errorf("init = mode %#o data %q", i.Mode, i.Data)
	}
	// The directories, /dev/console and /init, nothing else: the kernel has everything built in.
	if want := len(dirs) + 2; len(entries) != want {
		t.Errorf("%d entries, want exactly %d", len(entries), want)
	}
}

func TestInitramfsReproducible(t *testing.T) {
	spec := fakeSpec()
	for _, c := range []Compression{CompressNone, CompressGzip} {
		var outs [][]byte
		for range 2 {
			a, err := BuildInitramfs(spec)
			if err != nil {
				t.Fatal(err)
			}
			z, err := Compress(a, c)
			if err != nil {
				t.Fatal(err)
			}
			outs = append(outs, z)
		}
		if !bytes.Equal(outs[0], outs[1]) {
			t.Errorf("%s: two builds from the same inputs differ", c)
		}
		if c == CompressGzip {
			zr, err := gzip.NewReader(bytes.NewReader(outs[0]))
			if err != nil {
				t.Fatal(err)
			}
			if !zr.ModTime.IsZero() || zr.Name != "" {
				t.Errorf("gzip header carries mtime %v name %q", zr.ModTime, zr.Name)
			}
			if _, err := ReadArchive(zr); err != nil {
				t.Errorf("gzip initramfs does not decompress to an archive: %v", err)
			}
			io.Copy(io.Discard, zr)
		}
	}
	other := spec
	other.MTime++
	a, _ := BuildInitramfs(spec)
	b, _ := BuildInitramfs(other)
	if bytes.Equal(a, b) {
		t.Error("MTime did not reach the archive")
	}
}

func TestWriteFileIfChanged(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "sub", "initrd.img")
	wrote, err := WriteFileIfChanged(path, []byte("one"), 0o644)
	if err != nil || !wrote {
		t.Fatalf("first write: wrote=%v err=%v", wrote, err)
	}
	old := mustStat(t, path).ModTime().Add(-3600e9)
	if err := os.Chtimes(path, old, old); err != nil {
		t.Fatal(err)
	}
	wrote, err = WriteFileIfChanged(path, []byte("one"), 0o644)
	if err != nil || wrote {
		t.Fatalf("same content: wrote=%v err=%v, want no write", wrote, err)
	}
	if !mustStat(t, path).ModTime().Equal(old) {
		t.Error("unchanged content changed the mtime")
	}
	wrote, err = WriteFileIfChanged(path, []byte("two"), 0o644)
	if err != nil || !wrote {
		t.Fatalf("new content: wrote=%v err=%v", wrote, err)
	}
	if b, _ := os.ReadFile(path); string(b) != "two" {
		t.Errorf("content %q, want two", b)
	}
	if st := mustStat(t, path); st.Mode().Perm() != 0o644 || st.ModTime().Equal(old) {
		t.Errorf("after rewrite: mode %v mtime %v", st.Mode(), st.ModTime())
	}
	left, _ := os.ReadDir(filepath.Dir(path))
	if len(left) != 1 {
		t.Errorf("temp files left behind: %v", left)
	}
}

func mustStat(t *testing.T, path string) os.FileInfo {
	t.Helper()
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return st
}
