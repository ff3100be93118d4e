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

// rewriteRAM leaves a file that reads the same, as sparse, read-only, and out of reach of a descriptor opened on
// the file it replaced (one QEMU's user could have kept while it owned the file).
func TestRewriteRAMCutsOffDescriptorsOfTheBuild(t *testing.T) {
	const page = 4096
	dir := t.TempDir()
	ram := filepath.Join(dir, "ram")
	held, err := os.OpenFile(ram, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	if err := held.Truncate(1000 * page); err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte{0xa5}, 3*page)
	if _, err := held.WriteAt(data, 500*page); err != nil {
		t.Fatal(err)
	}
	if err := rewriteRAM(ram); err != nil {
		t.Fatal(err)
	}
	if _, err := held.WriteAt(bytes.Repeat([]byte{0xee}, page), 0); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(ram)
	if err != nil {
		t.Fatal(err)
	}
	want := make([]byte, 1000*page)
	copy(want[500*page:], data)
	if !bytes.Equal(got, want) {
		t.Error("the rewritten RAM differs from what the build left, or took a write through the build's descriptor")
	}
	var st unix.Stat_t
	if err := unix.Stat(ram, &st); err != nil {
		t.Fatal(err)
	}
	if st.Mode&0o777 != 0o400 || st.Uid != uint32(os.Geteuid()) {
		t.Errorf("rewritten RAM mode %#o uid %d, want 0400 and Kiln's", st.Mode&0o777, st.Uid)
	}
	if st.Blocks*512 > 16*page {
		t.Errorf("rewritten RAM holds %d bytes, want it sparse (3 pages of data)", st.Blocks*512)
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 1 {
		t.Errorf("directory holds %v, want the RAM file alone", entries)
	}
}
