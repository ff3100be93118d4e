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

// VsockTransportModule is the module that makes vsock reach the host; once
// it is loaded the agent API can be served.
const VsockTransportModule = "vmw_vsock_virtio_transport"

// ReadModuleList reads the module list file. A missing file is an empty
// list: a kernel with everything built in has nothing to load.
func ReadModuleList(listPath string) ([]string, error) {
	f, err := os.Open(listPath)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("open module list: %w", err)
	}
	defer f.Close()
	names, err := ParseModuleList(f)
	if err != nil {
		return nil, fmt.Errorf("read module list %s: %w", listPath, err)
	}
	return names, nil
}

// SplitModules splits a load-ordered module list after the module called
// name (a file name without .ko and compression suffixes). The list has
// dependencies first, so the first part holds everything name needs. When
// name is not in the list everything goes in the first part: what the list
// holds may then be needed for anything.
func SplitModules(names []string, name string) (first, rest []string) {
	for i, n := range names {
		if moduleName(n) == name {
			return names[:i+1], names[i+1:]
		}
	}
	return names, nil
}

// moduleName is a module file's module name: "kernel/net/vsock.ko.xz" is
// "vsock"; '-' and '_' are the same to the kernel and come out as '_'.
func moduleName(file string) string {
	base := filepath.Base(file)
	if i := strings.Index(base, ".ko"); i >= 0 {
		base = base[:i]
	}
	return strings.ReplaceAll(base, "-", "_")
}

// LoadModuleFiles loads the named modules, in order, from dir. A module
// that is already loaded (or built in) is fine; any other failure stops the
// loading and is returned, because a guest without its modules cannot reach
// the host.
func LoadModuleFiles(log *logrus.Entry, dir string, names []string) error {
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
