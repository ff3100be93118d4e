package containerd

import (
	"fmt"
	"path/filepath"
	"sort"
	"strings"
)

// CRINamespace is the containerd namespace CRI keeps its pods, containers and images in.
const CRINamespace = "k8s.io"

// CRIConfig turns on containerd's CRI plugin for a private containerd. Everything CRI writes stays under the
// daemon's directory: its root and state, the pods' network namespace files (netns_mounts_under_state_dir),
// and the registry configuration. The host's CNI plugin binaries are read from CNIBinDirs.
type CRIConfig struct {
	// SandboxImage is the pause image (pinned_images.sandbox). The harness imports it before any pod starts,
	// so CRI never pulls it.
	SandboxImage string
	// CNIConfDir holds the CNI network configuration CRI loads (the first file in name order).
	CNIConfDir string
	// CNIBinDirs are the directories CRI finds CNI plugins in.
	CNIBinDirs []string
	// Runtimes are the CRI runtime handlers; the first is the default.
	Runtimes []CRIRuntime
	// RegistryConfigDir is the hosts.toml tree (certs.d layout: <dir>/<host>/hosts.toml) CRI pulls through.
	// Empty: an empty directory under the daemon's, so the host's /etc/containerd/certs.d is never read.
	RegistryConfigDir string
}

// CRIRuntime is one CRI runtime handler (the name a RuntimeClass's handler, or crictl's --runtime, selects).
type CRIRuntime struct {
	Handler string
	// Type is the containerd runtime type, e.g. io.containerd.runc.v2 or io.containerd.kiln.v2.
	Type string
	// Options are the runtime's string options (runc: BinaryName; Kiln: ConfigPath).
	Options map[string]string
	// PodAnnotations are the pod annotation patterns passed on to the runtime (Kiln: io.kiln.*).
	PodAnnotations []string
}

// RuncCRIRuntime is the runc handler of a private containerd: runc.v2 running the given runc binary.
func RuncCRIRuntime(handler, runc string) CRIRuntime {
	return CRIRuntime{Handler: handler, Type: "io.containerd.runc.v2", Options: map[string]string{"BinaryName": runc}}
}

// KilnCRIRuntime is the Kiln handler: runtime type RuntimeName, Kiln's configuration at configPath, and the
// io.kiln.* pod annotations passed through. An empty configPath gives the entry no options: Kiln then reads the
// file containerd's environment names (config.PathEnv), which pods with user namespaces need.
func KilnCRIRuntime(handler, configPath string) CRIRuntime {
	r := CRIRuntime{Handler: handler, Type: RuntimeName, PodAnnotations: []string{"io.kiln.*"}}
	if configPath != "" {
		r.Options = map[string]string{"ConfigPath": configPath}
	}
	return r
}

// CRIRegistryDir is the registry configuration directory CRI reads when CRIConfig.RegistryConfigDir is empty.
func (d *Daemon) CRIRegistryDir() string {
	if c := d.opts.CRI; c != nil && c.RegistryConfigDir != "" {
		return c.RegistryConfigDir
	}
	return filepath.Join(d.Dir, "certs.d")
}

// criTOML is the CRI part of containerd's configuration (version 3), empty when CRI is off.
func (d *Daemon) criTOML() string {
	c := d.opts.CRI
	if c == nil {
		return ""
	}
	const images = `plugins.'io.containerd.cri.v1.images'`
	const rt = `plugins.'io.containerd.cri.v1.runtime'`
	var b strings.Builder
	fmt.Fprintf(&b, "\n[%s]\n  snapshotter = \"overlayfs\"\n", images)
	fmt.Fprintf(&b, "[%s.pinned_images]\n  sandbox = %q\n", images, c.SandboxImage)
	fmt.Fprintf(&b, "[%s.registry]\n  config_path = %q\n", images, d.CRIRegistryDir())

	// Lowering oom_score_adj is refused on these machines, and the pause container asks for -998.
	fmt.Fprintf(&b, "\n[%s]\n  restrict_oom_score_adj = true\n  netns_mounts_under_state_dir = true\n", rt)
	b.WriteString("  enable_selinux = false\n  cdi_spec_dirs = []\n")
	fmt.Fprintf(&b, "[%s.cni]\n  bin_dirs = %s\n  conf_dir = %q\n  max_conf_num = 1\n", rt, tomlStrings(c.CNIBinDirs), c.CNIConfDir)
	def := ""
	if len(c.Runtimes) > 0 {
		def = c.Runtimes[0].Handler
	}
	fmt.Fprintf(&b, "[%s.containerd]\n  default_runtime_name = %q\n", rt, def)
	for _, r := range c.Runtimes {
		key := fmt.Sprintf("%s.containerd.runtimes.%s", rt, r.Handler)
		fmt.Fprintf(&b, "[%s]\n  runtime_type = %q\n", key, r.Type)
		if len(r.PodAnnotations) > 0 {
			fmt.Fprintf(&b, "  pod_annotations = %s\n", tomlStrings(r.PodAnnotations))
		}
		if len(r.Options) > 0 {
			fmt.Fprintf(&b, "[%s.options]\n", key)
			names := make([]string, 0, len(r.Options))
			for k := range r.Options {
				names = append(names, k)
			}
			sort.Strings(names)
			for _, k := range names {
				fmt.Fprintf(&b, "  %s = %q\n", k, r.Options[k])
			}
		}
	}
	// The streaming server (exec, attach, port-forward) on loopback, on a port of the kernel's choosing.
	b.WriteString("\n[plugins.'io.containerd.grpc.v1.cri']\n  stream_server_address = \"127.0.0.1\"\n  stream_server_port = \"0\"\n")
	return b.String()
}

func tomlStrings(ss []string) string {
	q := make([]string, len(ss))
	for i, s := range ss {
		q[i] = fmt.Sprintf("%q", s)
	}
	return "[" + strings.Join(q, ", ") + "]"
}
