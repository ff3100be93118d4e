package cri

import (
	"encoding/json"
	"fmt"
	"os"
)

// The pod and container configurations `crictl runp` and `crictl create` read: the CRI messages
// PodSandboxConfig and ContainerConfig with the field names crictl's loader takes (the protobuf names,
// snake_case). Only the fields the harness's tests set are here; zero values are left out.

// Metadata names a pod or a container.
type Metadata struct {
	Name      string `json:"name"`
	UID       string `json:"uid,omitempty"`
	Namespace string `json:"namespace,omitempty"`
	Attempt   uint32 `json:"attempt,omitempty"`
}

// DNSConfig is the pod's resolv.conf.
type DNSConfig struct {
	Servers  []string `json:"servers,omitempty"`
	Searches []string `json:"searches,omitempty"`
	Options  []string `json:"options,omitempty"`
}

// PortMapping publishes a container port on the host.
type PortMapping struct {
	Protocol      int32  `json:"protocol,omitempty"` // 0 TCP, 1 UDP, 2 SCTP
	ContainerPort int32  `json:"container_port"`
	HostPort      int32  `json:"host_port,omitempty"`
	HostIP        string `json:"host_ip,omitempty"`
}

// Namespace modes of NamespaceOption.
const (
	NamespacePod       = 0
	NamespaceContainer = 1
	NamespaceNode      = 2
)

// NamespaceOption chooses which of a pod's namespaces are the pod's, the container's or the node's.
type NamespaceOption struct {
	Network       int            `json:"network,omitempty"`
	Pid           int            `json:"pid,omitempty"`
	Ipc           int            `json:"ipc,omitempty"`
	UsernsOptions *UserNamespace `json:"userns_options,omitempty"`
}

// UserNamespace is the pod's user namespace: NamespacePod with one uid and one gid mapping (what containerd
// takes), or NamespaceNode.
type UserNamespace struct {
	Mode int         `json:"mode"`
	Uids []IDMapping `json:"uids,omitempty"`
	Gids []IDMapping `json:"gids,omitempty"`
}

// IDMapping maps Length ids from ContainerID in the container to HostID.
type IDMapping struct {
	HostID      uint32 `json:"host_id"`
	ContainerID uint32 `json:"container_id"`
	Length      uint32 `json:"length"`
}

// PodSecurityContext is the part of LinuxSandboxSecurityContext the harness sets.
type PodSecurityContext struct {
	NamespaceOptions *NamespaceOption `json:"namespace_options,omitempty"`
	Privileged       bool             `json:"privileged,omitempty"`
}

// LinuxContainerResources are a container's (or, as overhead and resources, a pod's) limits.
type LinuxContainerResources struct {
	CPUPeriod          int64 `json:"cpu_period,omitempty"`
	CPUQuota           int64 `json:"cpu_quota,omitempty"`
	CPUShares          int64 `json:"cpu_shares,omitempty"`
	MemoryLimitInBytes int64 `json:"memory_limit_in_bytes,omitempty"`
	OOMScoreAdj        int64 `json:"oom_score_adj,omitempty"`
}

// LinuxPod is LinuxPodSandboxConfig.
type LinuxPod struct {
	CgroupParent    string                   `json:"cgroup_parent,omitempty"`
	SecurityContext *PodSecurityContext      `json:"security_context,omitempty"`
	Sysctls         map[string]string        `json:"sysctls,omitempty"`
	Overhead        *LinuxContainerResources `json:"overhead,omitempty"`
	Resources       *LinuxContainerResources `json:"resources,omitempty"`
}

// PodConfig is PodSandboxConfig.
type PodConfig struct {
	Metadata     Metadata          `json:"metadata"`
	Hostname     string            `json:"hostname,omitempty"`
	LogDirectory string            `json:"log_directory,omitempty"`
	DNSConfig    *DNSConfig        `json:"dns_config,omitempty"`
	PortMappings []PortMapping     `json:"port_mappings,omitempty"`
	Labels       map[string]string `json:"labels,omitempty"`
	Annotations  map[string]string `json:"annotations,omitempty"`
	Linux        *LinuxPod         `json:"linux,omitempty"`
}

// ImageSpec names a container's image.
type ImageSpec struct {
	Image string `json:"image"`
}

// KeyValue is one environment variable.
type KeyValue struct {
	Key   string `json:"key"`
	Value string `json:"value"`
}

// Mount is a host path mounted into a container.
type Mount struct {
	ContainerPath string `json:"container_path"`
	HostPath      string `json:"host_path"`
	Readonly      bool   `json:"readonly,omitempty"`
}

// ContainerSecurityContext is the part of LinuxContainerSecurityContext the harness sets.
type ContainerSecurityContext struct {
	NamespaceOptions *NamespaceOption `json:"namespace_options,omitempty"`
	Privileged       bool             `json:"privileged,omitempty"`
	ReadonlyRootfs   bool             `json:"readonly_rootfs,omitempty"`
}

// LinuxContainer is LinuxContainerConfig.
type LinuxContainer struct {
	Resources       *LinuxContainerResources  `json:"resources,omitempty"`
	SecurityContext *ContainerSecurityContext `json:"security_context,omitempty"`
}

// ContainerConfig is ContainerConfig.
type ContainerConfig struct {
	Metadata    Metadata          `json:"metadata"`
	Image       ImageSpec         `json:"image"`
	Command     []string          `json:"command,omitempty"`
	Args        []string          `json:"args,omitempty"`
	WorkingDir  string            `json:"working_dir,omitempty"`
	Envs        []KeyValue        `json:"envs,omitempty"`
	Mounts      []Mount           `json:"mounts,omitempty"`
	Labels      map[string]string `json:"labels,omitempty"`
	Annotations map[string]string `json:"annotations,omitempty"`
	// LogPath is relative to the pod's LogDirectory; without both, `crictl logs` has nothing to read.
	LogPath string          `json:"log_path,omitempty"`
	Stdin   bool            `json:"stdin,omitempty"`
	Tty     bool            `json:"tty,omitempty"`
	Linux   *LinuxContainer `json:"linux,omitempty"`
}

// NewPodConfig is a pod named name with a unique UID, in namespace "default", with its log directory under
// logDir.
func NewPodConfig(name, logDir string) *PodConfig {
	return &PodConfig{
		Metadata:     Metadata{Name: name, UID: name + "-uid", Namespace: "default"},
		LogDirectory: logDir,
		Linux:        &LinuxPod{},
	}
}

// NewContainerConfig is a container named name running image with command, logging to <name>.log in the pod's
// log directory.
func NewContainerConfig(name, image string, command ...string) *ContainerConfig {
	return &ContainerConfig{
		Metadata: Metadata{Name: name},
		Image:    ImageSpec{Image: image},
		Command:  command,
		LogPath:  name + ".log",
		Linux:    &LinuxContainer{},
	}
}

// WithResources sets the pod's resources and the annotations containerd derives from them for a runtime
// (io.kubernetes.cri.sandbox-cpu-period and the like come from Linux.Resources).
func (p *PodConfig) WithResources(r LinuxContainerResources) *PodConfig {
	if p.Linux == nil {
		p.Linux = &LinuxPod{}
	}
	p.Linux.Resources = &r
	return p
}

// WithAnnotation adds a pod annotation (io.kiln.* ones reach Kiln through pod_annotations).
func (p *PodConfig) WithAnnotation(k, v string) *PodConfig {
	if p.Annotations == nil {
		p.Annotations = map[string]string{}
	}
	p.Annotations[k] = v
	return p
}

// WithSysctl adds a pod sysctl.
func (p *PodConfig) WithSysctl(k, v string) *PodConfig {
	if p.Linux == nil {
		p.Linux = &LinuxPod{}
	}
	if p.Linux.Sysctls == nil {
		p.Linux.Sysctls = map[string]string{}
	}
	p.Linux.Sysctls[k] = v
	return p
}

// writeJSON writes v as JSON into path.
func writeJSON(path string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(path, b, 0o644); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}
