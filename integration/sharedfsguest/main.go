// Command sharedfsguest is the guest /init of the shared file system integration test. It mounts the virtio-fs
// share and, whenever what it sees there changes, prints every regular file with its content on the console,
// so the host can check that what it shares, before and after boot, reaches the guest. It stands alone (no
// agent, no vsock) so the test checks the shared file system and nothing else. Output:
//
//	SHAREDFS BEGIN
//	SHAREDFS FILE <path relative to the share> <content, Go-quoted>
//	SHAREDFS END
//
// and "SHAREDFS ERROR <text>" when it cannot go on.
package main

import (
	"bufio"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"time"

	"golang.org/x/sys/unix"
)

// Kept in step with the host side (runtime/share, vm/virtiofs).
const (
	tag       = "kiln-shared"
	sharedDir = "/run/kiln/shared"
)

func main() {
	out := os.Stdout
	if err := setup(); err != nil {
		fmt.Fprintf(out, "SHAREDFS ERROR %v\n", err)
	}
	var last []string
	for {
		snap := snapshot()
		if !slices.Equal(snap, last) {
			w := bufio.NewWriter(out)
			fmt.Fprintln(w, "SHAREDFS BEGIN")
			for _, l := range snap {
				fmt.Fprintln(w, l)
			}
			fmt.Fprintln(w, "SHAREDFS END")
			_ = w.Flush()
			last = snap
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func setup() error {
	for _, m := range []struct{ src, dir, typ string }{{"proc", "/proc", "proc"}, {"sysfs", "/sys", "sysfs"}, {"devtmpfs", "/dev", "devtmpfs"}} {
		_ = os.MkdirAll(m.dir, 0o755)
		if err := unix.Mount(m.src, m.dir, m.typ, 0, ""); err != nil && err != unix.EBUSY {
			return fmt.Errorf("mount %s: %w", m.dir, err)
		}
	}
	if err := os.MkdirAll(sharedDir, 0o755); err != nil {
		return err
	}
	if err := unix.Mount(tag, sharedDir, "virtiofs", 0, ""); err != nil {
		return fmt.Errorf("mount virtiofs %s: %w", tag, err)
	}
	return nil
}

// snapshot lists the share's regular files with their content, sorted by path.
func snapshot() []string {
	var lines []string
	err := filepath.WalkDir(sharedDir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			lines = append(lines, fmt.Sprintf("SHAREDFS WALKERROR %v", err))
			return nil
		}
		if !d.Type().IsRegular() {
			return nil
		}
		b, err := os.ReadFile(path)
		rel, _ := filepath.Rel(sharedDir, path)
		if err != nil {
			lines = append(lines, fmt.Sprintf("SHAREDFS READERROR %s %v", rel, err))
			return nil
		}
		lines = append(lines, fmt.Sprintf("SHAREDFS FILE %s %q", rel, b))
		return nil
	})
	if err != nil {
		lines = append(lines, fmt.Sprintf("SHAREDFS WALKERROR %v", err))
	}
	return lines
}
