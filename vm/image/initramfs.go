package image

import (
	"bytes"
	"compress/gzip"
	"fmt"
)

// Compression is how the initramfs is compressed; the kernel detects the
// format from the data itself.
type Compression string

// Supported compressions. None boots faster under TCG here: the kernel's
// inflate runs on the emulated CPU, while QEMU copies an uncompressed
// initrd into guest memory at host speed (measured in the package README).
const (
	CompressNone Compression = "none"
	CompressGzip Compression = "gzip"

	DefaultCompression = CompressNone
)

// ParseCompression accepts "none" or "gzip".
func ParseCompression(s string) (Compression, error) {
	switch c := Compression(s); c {
	case CompressNone, CompressGzip:
		return c, nil
	}
	return "", fmt.Errorf("unknown initramfs compression %q (want none or gzip)", s)
}

// InitramfsSpec is what goes into an initramfs.
type InitramfsSpec struct {
	Init  []byte // the /init executable
	MTime int64  // every entry's mtime (0 or SOURCE_DATE_EPOCH)
}

// BuildInitramfs returns the uncompressed newc archive for spec: /init, the
// mount points the guest needs before anything is mounted, and /dev/console
// so that PID 1 has a console before devtmpfs is mounted on /dev. The guest
// kernel has everything built in, so the archive carries no kernel modules.
func BuildInitramfs(spec InitramfsSpec) ([]byte, error) {
	if len(spec.Init) == 0 {
		return nil, fmt.Errorf("build initramfs: empty /init")
	}
	dir := func(name string, perm uint32) Entry { return Entry{Name: name, Mode: ModeDir | perm} }
	entries := []Entry{
		dir("dev", 0o755), dir("proc", 0o555), dir("sys", 0o555), dir("run", 0o755), dir("tmp", 0o1777),
		{Name: "dev/console", Mode: ModeCharDev | 0o600, RdevMajor: 5, RdevMinor: 1},
		{Name: "init", Mode: ModeRegular | 0o755, Data: spec.Init},
	}
	var buf bytes.Buffer
	if err := WriteArchive(&buf, entries, spec.MTime); err != nil {
		return nil, fmt.Errorf("build initramfs: %w", err)
	}
	return buf.Bytes(), nil
}

// Compress applies c to an archive. gzip output carries no name and a zero
// mtime, so it depends only on the input (and the Go release's deflate).
func Compress(archive []byte, c Compression) ([]byte, error) {
	switch c {
	case CompressNone, "":
		return archive, nil
	case CompressGzip:
		var buf bytes.Buffer
		zw, err := gzip.NewWriterLevel(&buf, gzip.BestCompression)
		if err != nil {
			return nil, fmt.Errorf("gzip initramfs: %w", err)
		}
		if _, err := zw.Write(archive); err != nil {
			return nil, fmt.Errorf("gzip initramfs: %w", err)
		}
		if err := zw.Close(); err != nil {
			return nil, fmt.Errorf("gzip initramfs: %w", err)
		}
		return buf.Bytes(), nil
	}
	return nil, fmt.Errorf("compress initramfs: unknown compression %q", c)
}
