package qemu

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// punchZeros deallocates exactly the pages that hold only zeros; the file reads the same after.
func TestPunchZeros(t *testing.T) {
	const page = 4096
	path := filepath.Join(t.TempDir(), "ram")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	// 600 pages: written zeros at 0–99, data at 100, zeros at 101–399 (across the scan's 256-page reads), data
	// at 400 and 401, a hole at 402–549, zeros at 550–599 and a partial page of data after them.
	const size = 600*page + 100
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	write := func(off int64, b []byte) {
		if _, err := f.WriteAt(b, off); err != nil {
			t.Fatal(err)
		}
	}
	write(0, make([]byte, 100*page))
	write(100*page, bytes.Repeat([]byte{1}, page))
	write(101*page, make([]byte, 299*page))
	write(400*page, bytes.Repeat([]byte{2}, 2*page-1))
	write(550*page, make([]byte, 50*page))
	write(600*page, bytes.Repeat([]byte{3}, 100))
	f.Close()
	before, _ := os.ReadFile(path)
	n, err := punchZeros(path)
	if err != nil {
		t.Fatal(err)
	}
	if want := int64((100 + 299 + 50) * page); n != want {
		t.Errorf("punched %d bytes, want %d", n, want)
	}
	after, _ := os.ReadFile(path)
	if !bytes.Equal(before, after) {
		t.Error("the file reads differently after punching")
	}
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	if got, want := st.Blocks*512, int64(4*page); got > want+page {
		t.Errorf("file holds %d bytes after punching, want about %d", got, want)
	}
}
