package agent

import (
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

func TestParseDevNumber(t *testing.T) {
	tests := []struct {
		in      string
		want    uint64
		wantErr bool
	}{
		{"259:0\n", unix.Mkdev(259, 0), false},
		{"8:17", unix.Mkdev(8, 17), false},
		{"259", 0, true},
		{"a:0", 0, true},
		{"1:-1", 0, true},
		{"4294967296:0", 0, true},
	}
	for _, tt := range tests {
		got, err := parseDevNumber(tt.in)
		if (err != nil) != tt.wantErr || got != tt.want {
			t.Errorf("parseDevNumber(%q) = %d, %v; want %d, error %v", tt.in, got, err, tt.want, tt.wantErr)
		}
	}
}

// The agent runs from its image only when the image's binary is its own, byte for byte.
func TestSameContent(t *testing.T) {
	dir := t.TempDir()
	big := make([]byte, 3<<20+5)
	for i := range big {
		big[i] = byte(i * 7)
	}
	changedLate := append([]byte{}, big...)
	changedLate[len(big)-2] ^= 1
	files := map[string][]byte{"a": big, "same": big, "late": changedLate, "short": big[:len(big)-1], "empty": nil}
	for name, data := range files {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	tests := []struct {
		b    string
		want bool
	}{{"same", true}, {"late", false}, {"short", false}, {"empty", false}}
	for _, tt := range tests {
		got, err := sameContent(filepath.Join(dir, "a"), filepath.Join(dir, tt.b))
		if err != nil || got != tt.want {
			t.Errorf("sameContent(a, %s) = %v, %v; want %v", tt.b, got, err, tt.want)
		}
	}
	if same, err := sameContent(filepath.Join(dir, "empty"), filepath.Join(dir, "empty")); err != nil || !same {
		t.Errorf("two empty files: %v, %v", same, err)
	}
	if _, err := sameContent(filepath.Join(dir, "a"), filepath.Join(dir, "missing")); err == nil {
		t.Error("no error for a missing file")
	}
}
