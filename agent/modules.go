package agent

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"
)

// Where the guest image puts its kernel modules and the order to load them in.
const (
	ModuleListPath = "/etc/kiln/modules"
	ModuleDir      = "/lib/modules"
)

// ParseModuleList reads a module list: one module file name per line,
// relative to the module directory, in load order (dependencies first). Blank
// lines and lines starting with '#' are ignored. Names that would leave the
// module directory are refused.
func ParseModuleList(r io.Reader) ([]string, error) {
	var names []string
	sc := bufio.NewScanner(r)
	for line := 1; sc.Scan(); line++ {
		name := strings.TrimSpace(sc.Text())
		if name == "" || strings.HasPrefix(name, "#") {
			continue
		}
		if !filepath.IsLocal(name) {
			return nil, fmt.Errorf("line %d: module %q is not a path inside the module directory", line, name)
		}
		names = append(names, name)
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	return names, nil
}

// LoadModules loads the modules named in the list file, in order, from dir.
// A missing list file means there is nothing to load (a kernel with
// everything built in). A module that is already loaded (or built in) is
// fine; any other failure stops the loading and is returned, because a guest
// without its modules cannot reach the host.
func LoadModules(log *logrus.Entry, listPath, dir string) error {
	f, err := os.Open(listPath)
	if errors.Is(err, os.ErrNotExist) {
		log.WithField("list", listPath).Debug("no module list, loading no modules")
		return nil
	}
	if err != nil {
		return fmt.Errorf("open module list: %w", err)
	}
	names, err := ParseModuleList(f)
	f.Close()
	if err != nil {
		return fmt.Errorf("read module list %s: %w", listPath, err)
	}
	for _, name := range names {
		path := filepath.Join(dir, name)
		loaded, err := loadModule(path)
		if err != nil {
			return fmt.Errorf("load kernel module %s: %w", path, err)
		}
		log.WithFields(logrus.Fields{"module": name, "new": loaded}).Debug("kernel module ready")
	}
	return nil
}

// loadModule reports false when the kernel already had the module.
func loadModule(path string) (bool, error) {
	f, err := os.Open(path)
	if err != nil {
		return false, err
	}
	defer f.Close()
	err = unix.FinitModule(int(f.Fd()), "", moduleFlags(path))
	if errors.Is(err, unix.EEXIST) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	return true, nil
}

// moduleFlags lets the kernel decompress compressed modules itself (Linux
// 6.0+ with CONFIG_MODULE_DECOMPRESS), so the agent needs no decompressors.
func moduleFlags(path string) int {
	for _, ext := range []string{".ko.xz", ".ko.zst", ".ko.gz"} {
		if strings.HasSuffix(path, ext) {
			return unix.MODULE_INIT_COMPRESSED_FILE
		}
	}
	return 0
}
