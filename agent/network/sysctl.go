package network

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/kiln-runtime/kiln/netns"
)

// SetSysctls writes net.* sysctls in the pod namespace, as the agent. A container with a user namespace of its
// own cannot write them itself: the pod namespace belongs to the guest's initial user namespace, where the
// container's root is nobody (on a runc host CRI makes the pod's network namespace inside the pod's user
// namespace instead). They are the pod's settings, so writing them once for the pod is what runc's per-container
// writes amount to.
func (p *Pod) SetSysctls(values map[string]string) error {
	if len(values) == 0 {
		return nil
	}
	keys := make([]string, 0, len(values))
	for k := range values {
		if _, ok := sysctlFile(k); !ok {
			return fmt.Errorf("sysctl %q: not a net.* sysctl name", k)
		}
		keys = append(keys, k)
	}
	sort.Strings(keys)
	path, err := p.Path()
	if err != nil {
		return err
	}
	// /proc/sys/net shows the sysctls of the opening thread's namespace.
	return netns.DoPath(path, func() error {
		var werr error
		for _, k := range keys {
			file, _ := sysctlFile(k)
			if err := os.WriteFile(file, []byte(values[k]), 0); err != nil {
				werr = errors.Join(werr, fmt.Errorf("write sysctl %s in the pod network namespace: %w", k, err))
			}
		}
		return werr
	})
}

// sysctlFile is the file under /proc/sys of a net.* sysctl name, or false if name is none. OCI names a sysctl
// with dots between components (a slash stands for a dot inside one, as in net.ipv4.conf.eth0/100.rp_filter);
// nothing may leave /proc/sys/net.
func sysctlFile(name string) (string, bool) {
	parts := strings.Split(name, ".")
	if len(parts) < 2 || parts[0] != "net" {
		return "", false
	}
	for i, c := range parts {
		if c == "" || strings.IndexFunc(c, notSysctlChar) >= 0 {
			return "", false
		}
		c = strings.ReplaceAll(c, "/", ".")
		if c == "." || c == ".." {
			return "", false
		}
		parts[i] = c
	}
	return filepath.Join(append([]string{"/proc/sys"}, parts...)...), true
}

// notSysctlChar says whether r cannot appear in a component of a sysctl's name. Checked by hand, not with a
// regular expression: a package-level one is compiled in every process the agent's binary becomes (each
// container's and each exec's init), before anything else runs, and under TCG that costs milliseconds.
func notSysctlChar(r rune) bool {
	return !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '_' || r == '/' || r == '-')
}
