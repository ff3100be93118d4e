// Package bundle is the one loader of OCI bundles on the host: config.json and the root file system it names.
// Every check a runtime needs before it boots anything is made here, so a bad bundle is an InvalidArgument error
// before any VM starts. It knows nothing of VMs, shares or containerd's task API.
package bundle

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// ConfigFile is the bundle's runtime spec.
const ConfigFile = "config.json"

// Bundle is a loaded OCI bundle.
type Bundle struct {
	// Dir is the bundle directory, absolute.
	Dir  string
	Spec *specs.Spec
	// Rootfs is the host path of the root file system: root.path resolved against Dir. containerd makes it an
	// empty directory when the root comes from the snapshotter's mounts.
	Rootfs string
}

// Load reads dir/config.json and resolves its root. A missing, unreadable or invalid bundle is an error that
// matches errdefs.ErrInvalidArgument and names the bundle and what is wrong.
func Load(dir string) (*Bundle, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, invalid(dir, "%v", err)
	}
	raw, err := os.ReadFile(filepath.Join(abs, ConfigFile))
	if err != nil {
		return nil, invalid(dir, "read %s: %v", ConfigFile, err)
	}
	var spec specs.Spec
	if err := json.Unmarshal(raw, &spec); err != nil {
		return nil, invalid(dir, "parse %s: %v", ConfigFile, err)
	}
	if spec.Process == nil {
		return nil, invalid(dir, "%s has no process", ConfigFile)
	}
	if len(spec.Process.Args) == 0 && spec.Process.CommandLine == "" {
		return nil, invalid(dir, "%s has no process.args", ConfigFile)
	}
	if spec.Root == nil || spec.Root.Path == "" {
		return nil, invalid(dir, "%s has no root.path", ConfigFile)
	}
	root := spec.Root.Path
	if !filepath.IsAbs(root) {
		root = filepath.Join(abs, root)
	}
	st, err := os.Stat(root)
	if err != nil {
		return nil, invalid(dir, "root %s: %v", root, err)
	}
	if !st.IsDir() {
		return nil, invalid(dir, "root %s: %v", root, errors.New("not a directory"))
	}
	return &Bundle{Dir: abs, Spec: &spec, Rootfs: root}, nil
}

// Annotations reads only the annotations of dir's config.json: the shim's `start` command groups tasks by them
// before it knows whether the rest of the bundle is sound; Create checks the whole of it.
func Annotations(dir string) (map[string]string, error) {
	raw, err := os.ReadFile(filepath.Join(dir, ConfigFile))
	if err != nil {
		return nil, invalid(dir, "read %s: %v", ConfigFile, err)
	}
	var spec struct {
		Annotations map[string]string `json:"annotations"`
	}
	if err := json.Unmarshal(raw, &spec); err != nil {
		return nil, invalid(dir, "parse %s: %v", ConfigFile, err)
	}
	return spec.Annotations, nil
}

// ReadOnly says whether the spec asks for a read-only root.
func (b *Bundle) ReadOnly() bool { return b.Spec.Root != nil && b.Spec.Root.Readonly }

func invalid(dir, format string, args ...any) error {
	return fmt.Errorf("%w: bundle %s: %s", errdefs.ErrInvalidArgument, dir, fmt.Sprintf(format, args...))
}
