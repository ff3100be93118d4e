package container

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// Bundle is an OCI bundle on the host: config.json and the root file system it names.
type Bundle struct {
	Dir  string
	Spec *specs.Spec
	// Rootfs is the host path of the root file system (root.path resolved against Dir).
	Rootfs string
}

// LoadBundle reads dir/config.json and resolves its root. It checks what a runtime needs before it boots
// anything: a process with arguments and an existing root directory.
func LoadBundle(dir string) (*Bundle, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, fmt.Errorf("bundle %s: %w", dir, err)
	}
	raw, err := os.ReadFile(filepath.Join(abs, "config.json"))
	if err != nil {
		return nil, fmt.Errorf("bundle %s: read config: %w", dir, err)
	}
	var spec specs.Spec
	if err := json.Unmarshal(raw, &spec); err != nil {
		return nil, fmt.Errorf("bundle %s: parse config.json: %w", dir, err)
	}
	if spec.Root == nil || spec.Root.Path == "" {
		return nil, fmt.Errorf("bundle %s: config.json has no root.path", dir)
	}
	if spec.Process == nil || len(spec.Process.Args) == 0 {
		return nil, fmt.Errorf("bundle %s: config.json has no process.args", dir)
	}
	rootfs := spec.Root.Path
	if !filepath.IsAbs(rootfs) {
		rootfs = filepath.Join(abs, rootfs)
	}
	st, err := os.Stat(rootfs)
	if err != nil {
		return nil, fmt.Errorf("bundle %s: root %s: %w", dir, rootfs, err)
	}
	if !st.IsDir() {
		return nil, fmt.Errorf("bundle %s: root %s: %w", dir, rootfs, errors.New("not a directory"))
	}
	return &Bundle{Dir: abs, Spec: &spec, Rootfs: rootfs}, nil
}
