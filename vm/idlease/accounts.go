package idlease

import (
	"bufio"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// KubeletUnbounded says whether kubelet runs on this host (its state directory, kubeletDir, exists) with no
// "kubelet" entry in etc's subuid: kubelet then gives pods with user namespaces blocks of 65536 ids from anywhere
// above 65535, any range of Kiln's among them, and their files on the host are owned by those ids.
func KubeletUnbounded(etc, kubeletDir string) (bool, error) {
	if _, err := os.Stat(kubeletDir); errors.Is(err, fs.ErrNotExist) {
		return false, nil
	} else if err != nil {
		return false, err
	}
	b, err := os.ReadFile(filepath.Join(etc, "subuid"))
	if errors.Is(err, fs.ErrNotExist) {
		return true, nil
	}
	if err != nil {
		return false, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if name, _, ok := strings.Cut(line, ":"); ok && name == "kubelet" {
			return false, nil
		}
	}
	return true, nil
}

// Claimed lists what the host's account files under etc (/etc) give ids of r to: users and groups of passwd and
// group, and subordinate ranges of subuid and subgid (rootless containers', kubelet's user namespaces). A QEMU
// running as such an id would own their files. Files that are missing are passed over; accounts kept elsewhere
// (LDAP, systemd's dynamic users) are not seen.
func (r Range) Claimed(etc string) ([]string, error) {
	var out []string
	for _, f := range []struct {
		name string
		// idField is the field holding the id; countField, if not 0, holds a count of ids from it.
		idField, countField int
	}{{"passwd", 2, 0}, {"group", 2, 0}, {"subuid", 1, 2}, {"subgid", 1, 2}} {
		p := filepath.Join(etc, f.name)
		file, err := os.Open(p)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return out, err
		}
		sc := bufio.NewScanner(file)
		for sc.Scan() {
			fields := strings.Split(sc.Text(), ":")
			if len(fields) <= max(f.idField, f.countField) || strings.HasPrefix(fields[0], "#") {
				continue
			}
			first, err := strconv.ParseUint(fields[f.idField], 10, 32)
			if err != nil {
				continue
			}
			count := uint64(1)
			if f.countField != 0 {
				if count, err = strconv.ParseUint(fields[f.countField], 10, 32); err != nil || count == 0 {
					continue
				}
			}
			if first < uint64(r.First)+uint64(r.Count) && uint64(r.First) < first+count {
				entry := fmt.Sprintf("%s %s (%d)", p, fields[0], first)
				if f.countField != 0 {
					entry = fmt.Sprintf("%s %s (%d:%d)", p, fields[0], first, count)
				}
				out = append(out, entry)
			}
		}
		err = sc.Err()
		file.Close()
		if err != nil {
			return out, fmt.Errorf("read %s: %w", p, err)
		}
	}
	return out, nil
}
