package image

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"strconv"
)

// ReadArchive parses a newc archive up to its trailer. It is the inverse of
// WriteArchive, written independently, so that the tests can check what a
// built image holds without trusting the writer.
func ReadArchive(r io.Reader) ([]Entry, error) {
	br := &countingReader{r: bufio.NewReader(r)}
	var out []Entry
	for {
		start := br.n
		hdr := make([]byte, newcHdrLen)
		if _, err := io.ReadFull(br, hdr); err != nil {
			return nil, fmt.Errorf("read cpio header at offset %d: %w", start, err)
		}
		if string(hdr[:6]) != newcMagic {
			return nil, fmt.Errorf("read cpio header at offset %d: bad magic %q", start, hdr[:6])
		}
		var f [13]uint32
		for i := range f {
			v, err := strconv.ParseUint(string(hdr[6+8*i:14+8*i]), 16, 32)
			if err != nil {
				return nil, fmt.Errorf("read cpio header at offset %d field %d: %w", start, i, err)
			}
			f[i] = uint32(v)
		}
		name := make([]byte, f[11])
		if _, err := io.ReadFull(br, name); err != nil {
			return nil, fmt.Errorf("read cpio name at offset %d: %w", start, err)
		}
		if err := br.skip(pad4(br.n)); err != nil {
			return nil, fmt.Errorf("read cpio name padding: %w", err)
		}
		e := Entry{Name: string(bytes.TrimRight(name, "\x00")), Mode: f[1], RdevMajor: f[9], RdevMinor: f[10]}
		if e.Name == trailerName {
			return out, nil
		}
		e.Data = make([]byte, f[6])
		if _, err := io.ReadFull(br, e.Data); err != nil {
			return nil, fmt.Errorf("read cpio data of %q: %w", e.Name, err)
		}
		if err := br.skip(pad4(br.n)); err != nil {
			return nil, fmt.Errorf("read cpio data padding of %q: %w", e.Name, err)
		}
		if len(e.Data) == 0 {
			e.Data = nil
		}
		out = append(out, e)
	}
}

type countingReader struct {
	r io.Reader
	n int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}

func (c *countingReader) skip(n int64) error {
	_, err := io.CopyN(io.Discard, c, n)
	return err
}
