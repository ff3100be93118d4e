package image

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"sort"
)

// Mode type bits as the kernel's initramfs unpacker reads them from a newc
// header (the values are the traditional S_IF* octal constants).
const (
	ModeDir     = 0o040000
	ModeRegular = 0o100000
	ModeCharDev = 0o020000
	modeTypeMsk = 0o170000
)

const (
	newcMagic   = "070701"
	newcHdrLen  = 110
	trailerName = "TRAILER!!!"
)

// Entry is one member of a newc archive. Name is relative, without a leading
// slash ("dev/console"). Mode holds both the type bits (ModeDir, ...) and the
// permission bits.
type Entry struct {
	Name      string
	Mode      uint32
	Data      []byte
	RdevMajor uint32
	RdevMinor uint32
}

// WriteArchive writes entries as a newc ("070701") cpio archive followed by
// the trailer. Entries are written sorted by name, so a parent directory
// always precedes its children and the same set of entries always gives the
// same bytes: inode numbers are assigned 1, 2, ... in that order, owners are
// 0:0 and every mtime is the given one.
func WriteArchive(w io.Writer, entries []Entry, mtime int64) error {
	sorted := append([]Entry(nil), entries...)
	sort.Slice(sorted, func(i, j int) bool { return sorted[i].Name < sorted[j].Name })
	bw := bufio.NewWriter(w)
	var off int64
	for i, e := range sorted {
		if i > 0 && sorted[i-1].Name == e.Name {
			return fmt.Errorf("write cpio: duplicate entry %q", e.Name)
		}
		if err := validateEntry(e); err != nil {
			return fmt.Errorf("write cpio entry %q: %w", e.Name, err)
		}
		nlink := uint32(1)
		if e.Mode&modeTypeMsk == ModeDir {
			nlink = 2
		}
		n, err := writeMember(bw, e, uint32(i+1), nlink, mtime, off)
		if err != nil {
			return fmt.Errorf("write cpio entry %q: %w", e.Name, err)
		}
		off += n
	}
	if _, err := writeMember(bw, Entry{Name: trailerName}, 0, 1, 0, off); err != nil {
		return fmt.Errorf("write cpio trailer: %w", err)
	}
	if err := bw.Flush(); err != nil {
		return fmt.Errorf("write cpio: %w", err)
	}
	return nil
}

func validateEntry(e Entry) error {
	if e.Name == "" || e.Name[0] == '/' || !fs.ValidPath(e.Name) || e.Name == "." {
		return errors.New("name must be a clean relative path")
	}
	switch e.Mode & modeTypeMsk {
	case ModeRegular:
	case ModeDir, ModeCharDev:
		if len(e.Data) != 0 {
			return errors.New("only regular files carry data")
		}
	default:
		return fmt.Errorf("unsupported file type %#o", e.Mode&modeTypeMsk)
	}
	if int64(len(e.Data)) > 0xffffffff {
		return errors.New("file larger than 4 GiB does not fit a newc header")
	}
	return nil
}

// writeMember writes one header, name and data, each padded to 4 bytes as
// newc requires, and returns how many bytes it wrote; off is the archive
// offset it starts at (padding is relative to the archive start).
func writeMember(w io.Writer, e Entry, ino, nlink uint32, mtime, off int64) (int64, error) {
	var hdr bytes.Buffer
	hdr.WriteString(newcMagic)
	for _, v := range []uint32{
		ino, e.Mode, 0, 0, nlink, uint32(mtime), uint32(len(e.Data)),
		0, 0, e.RdevMajor, e.RdevMinor, uint32(len(e.Name) + 1), 0,
	} {
		fmt.Fprintf(&hdr, "%08x", v)
	}
	hdr.WriteString(e.Name)
	hdr.WriteByte(0)
	hdr.Write(make([]byte, pad4(off+int64(hdr.Len()))))
	hdr.Write(e.Data)
	hdr.Write(make([]byte, pad4(off+int64(hdr.Len()))))
	n, err := w.Write(hdr.Bytes())
	return int64(n), err
}

func pad4(n int64) int64 { return (4 - n%4) % 4 }
