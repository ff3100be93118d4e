package image

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

func sampleEntries() []Entry {
	return []Entry{
		{Name: "init", Mode: ModeRegular | 0o755, Data: []byte("#!/bin/true\n")},
		{Name: "dev", Mode: ModeDir | 0o755},
		{Name: "dev/console", Mode: ModeCharDev | 0o600, RdevMajor: 5, RdevMinor: 1},
		{Name: "etc", Mode: ModeDir | 0o755},
		{Name: "etc/a", Mode: ModeRegular | 0o644, Data: []byte("x")},     // 1 byte: needs 3 padding
		{Name: "etc/bb", Mode: ModeRegular | 0o644, Data: []byte("yyyy")}, // already aligned
		{Name: "etc/empty", Mode: ModeRegular | 0o644},
	}
}

func TestArchiveRoundTrip(t *testing.T) {
	var buf bytes.Buffer
	if err := WriteArchive(&buf, sampleEntries(), 1700000000); err != nil {
		t.Fatal(err)
	}
	if buf.Len()%4 != 0 {
		t.Errorf("archive length %d not 4-aligned", buf.Len())
	}
	got, err := ReadArchive(bytes.NewReader(buf.Bytes()))
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range got {
		names = append(names, e.Name)
	}
	want := []string{"dev", "dev/console", "etc", "etc/a", "etc/bb", "etc/empty", "init"}
	if !reflect.DeepEqual(names, want) {
		t.Fatalf("names %q, want sorted %q", names, want)
	}
	byName := map[string]Entry{}
	for _, e := range sampleEntries() {
		byName[e.Name] = e
	}
	for _, e := range got {
		if !reflect.DeepEqual(e, byName[e.Name]) {
			t.Errorf("entry %q read back as %+v, wrote %+v", e.Name, e, byName[e.Name])
		}
	}
}

// TestArchiveReadByDebianCpio checks the writer against an independent
// reader, so a bug shared by WriteArchive and ReadArchive cannot hide.
func TestArchiveReadByDebianCpio(t *testing.T) {
	if _, err := exec.LookPath("cpio"); err != nil {
		t.Skip("cpio not installed")
	}
	var buf bytes.Buffer
	if err := WriteArchive(&buf, sampleEntries(), 0); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("cpio", "-itv", "--quiet")
	cmd.Stdin = bytes.NewReader(buf.Bytes())
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("cpio -itv: %v\n%s", err, out)
	}
	listing := string(out)
	for _, want := range []string{"crw-------", "5,   1", "dev/console", "-rwxr-xr-x", " init", "etc/bb", "1970"} {
		if !strings.Contains(listing, want) {
			t.Errorf("cpio listing lacks %q:\n%s", want, listing)
		}
	}
	// Extract regular files (mknod may be refused) and compare contents.
	dir := t.TempDir()
	cmd = exec.Command("cpio", "-id", "--quiet", "--no-absolute-filenames", "init", "etc/*")
	cmd.Dir = dir
	cmd.Stdin = bytes.NewReader(buf.Bytes())
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("cpio -id: %v\n%s", err, out)
	}
	for name, want := range map[string]string{"init": "#!/bin/true\n", "etc/a": "x", "etc/bb": "yyyy", "etc/empty": ""} {
		got, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil || string(got) != want {
			t.Errorf("extracted %s = %q, %v; want %q", name, got, err, want)
		}
	}
}

func TestArchiveDeterministic(t *testing.T) {
	a, b := sampleEntries(), sampleEntries()
	// Same entries in another order must give the same bytes.
	for i, j := 0, len(b)-1; i < j; i, j = i+1, j-1 {
		b[i], b[j] = b[j], b[i]
	}
	var x, y bytes.Buffer
	if err := WriteArchive(&x, a, 42); err != nil {
		t.Fatal(err)
	}
	if err := WriteArchive(&y, b, 42); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(x.Bytes(), y.Bytes()) {
		t.Fatal("entry order changed the archive bytes")
	}
}

func TestArchiveRejects(t *testing.T) {
	for _, tc := range []struct {
		name    string
		entries []Entry
	}{
		{"duplicate", []Entry{{Name: "a", Mode: ModeDir}, {Name: "a", Mode: ModeDir}}},
		{"absolute", []Entry{{Name: "/init", Mode: ModeRegular}}},
		{"dotdot", []Entry{{Name: "../x", Mode: ModeRegular}}},
		{"empty name", []Entry{{Name: "", Mode: ModeRegular}}},
		{"dir with data", []Entry{{Name: "d", Mode: ModeDir, Data: []byte("x")}}},
		{"symlink unsupported", []Entry{{Name: "l", Mode: 0o120000}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := WriteArchive(&bytes.Buffer{}, tc.entries, 0); err == nil {
				t.Fatal("want error")
			}
		})
	}
}
