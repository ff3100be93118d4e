// Package bundle is the one loader of OCI bundles on the host: config.json and the root file system it names.
// Every check a runtime needs before it boots anything is made here, so a bad bundle is an InvalidArgument error
// before any VM starts. It knows nothing of VMs, shares or containerd's task API.
package bundle

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// ConfigFile is the bundle's runtime spec.
const ConfigFile = "config.json"

// MaxConfigSize bounds config.json. The spec reaches the guest agent in one request of the agent API, whose
// messages (ttrpc) are at most 4 MiB; 64 KiB of that is left for the request's other fields and for the guest
// paths the host writes into the spec in place of host paths. A bigger spec is refused before a VM boots.
const MaxConfigSize = 4<<20 - 64<<10

// SandboxAnnotation is the annotation CRI puts on every container of a pod, naming the pod's sandbox.
const SandboxAnnotation = "io.kubernetes.cri.sandbox-id"

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
	raw, err := readConfig(abs)
	if err != nil {
		return nil, invalid(dir, "%v", err)
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
	if err := checkLinux(spec.Linux); err != nil {
		return nil, invalid(dir, "%s: %v", ConfigFile, err)
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
	raw, err := readConfig(dir)
	if err != nil {
		return nil, invalid(dir, "%v", err)
	}
	var spec struct {
		Annotations map[string]string `json:"annotations"`
	}
	if err := json.Unmarshal(raw, &spec); err != nil {
		return nil, invalid(dir, "parse %s: %v", ConfigFile, err)
	}
	return spec.Annotations, nil
}

// readConfig reads dir's config.json, refusing one larger than MaxConfigSize without reading more of it.
func readConfig(dir string) ([]byte, error) {
	f, err := os.Open(filepath.Join(dir, ConfigFile))
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", ConfigFile, err)
	}
	defer f.Close()
	raw, err := io.ReadAll(io.LimitReader(f, MaxConfigSize+1))
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", ConfigFile, err)
	}
	if len(raw) > MaxConfigSize {
		return nil, fmt.Errorf("%s is larger than %d bytes, the most the agent API carries to the guest in one "+
			"message (4 MiB less room for the rest of the request): make its environment, annotations or mounts smaller",
			ConfigFile, MaxConfigSize)
	}
	return raw, nil
}

// checkLinux refuses what no Linux runtime can do, naming the field: a namespace type Linux does not have, and
// a negative resource limit other than -1 (no limit), which the guest's cgroups would reject only after the VM
// booted. Limits too big for a VM are config.ForPod's to refuse, as it sizes the VM.
func checkLinux(l *specs.Linux) error {
	if l == nil {
		return nil
	}
	var errs []error
	for i, ns := range l.Namespaces {
		switch ns.Type {
		case specs.PIDNamespace, specs.NetworkNamespace, specs.MountNamespace, specs.IPCNamespace, specs.UTSNamespace,
			specs.UserNamespace, specs.CgroupNamespace, specs.TimeNamespace:
		default:
			errs = append(errs, fmt.Errorf("linux.namespaces[%d]: unknown namespace type %q: want pid, network, mount, ipc, uts, user, cgroup or time", i, ns.Type))
		}
	}
	r := l.Resources
	if r == nil {
		return errors.Join(errs...)
	}
	limit := func(field string, v *int64) {
		if v != nil && *v < -1 {
			errs = append(errs, fmt.Errorf("linux.resources.%s = %d: want -1 (no limit) or a positive number", field, *v))
		}
	}
	if m := r.Memory; m != nil {
		limit("memory.limit", m.Limit)
		limit("memory.reservation", m.Reservation)
		limit("memory.swap", m.Swap)
	}
	if c := r.CPU; c != nil {
		limit("cpu.quota", c.Quota)
	}
	if p := r.Pids; p != nil {
		limit("pids.limit", p.Limit)
	}
	return errors.Join(errs...)
}

// ReadOnly says whether the spec asks for a read-only root.
func (b *Bundle) ReadOnly() bool { return b.Spec.Root != nil && b.Spec.Root.Readonly }

func invalid(dir, format string, args ...any) error {
	return fmt.Errorf("%w: bundle %s: %s", errdefs.ErrInvalidArgument, dir, fmt.Sprintf(format, args...))
}
