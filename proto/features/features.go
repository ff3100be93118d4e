// Package features is what Kiln's runtime supports, in the OCI runtime features format (what `runc features`
// prints): the shim reports it to containerd (the `-info` flag), which tells CRI clients, for example, whether
// recursive read-only mounts and user namespaces work. Containers run through runc's libcontainer in the guest,
// so the lists are libcontainer's; a test in agent/container keeps them equal to the libcontainer the agent
// links.
package features

import (
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/opencontainers/runtime-spec/specs-go/features"
)

// MountOptions are the mount options libcontainer (v1.5) knows, "rro" among them.
var mountOptions = []string{
	"async", "atime", "bind", "defaults", "dev", "diratime", "dirsync", "exec", "iversion", "lazytime",
	"loud", "mand", "noatime", "nodev", "nodiratime", "noexec", "noiversion", "nolazytime", "nomand", "norelatime",
	"nostrictatime", "nosuid", "nosymfollow", "private", "ratime", "rbind", "rdev", "rdiratime", "relatime",
	"remount", "rexec", "rnoatime", "rnodev", "rnodiratime", "rnoexec", "rnorelatime", "rnostrictatime",
	"rnosuid", "rnosymfollow", "ro", "rprivate", "rrelatime", "rro", "rrw", "rshared", "rslave", "rstrictatime",
	"rsuid", "rsymfollow", "runbindable", "rw", "shared", "silent", "slave", "strictatime", "suid", "symfollow",
	"sync", "tmpcopyup", "unbindable",
}

// namespaces are the namespace types libcontainer knows.
var namespaces = []string{"cgroup", "ipc", "mount", "network", "pid", "time", "user", "uts"}

// MountOptions are the mount options containers may use.
func MountOptions() []string { return append([]string(nil), mountOptions...) }

// Namespaces are the namespace types containers may have.
func Namespaces() []string { return append([]string(nil), namespaces...) }

// OCI is Kiln's runtime features. Hooks are those Kiln runs on the host (createContainer and startContainer
// would have to run in the guest). Idmapped mounts are on: the guest's virtio-fs (Linux 6.1) cannot idmap, but
// the shim honours the "uidmap="/"gidmap=" options of a container's root mounts by idmapping them on the host
// (runtime/share), so CRI offers user namespaces (it needs both). Spec mounts with their own mappings are
// refused (runtime/pod), not dropped.
func OCI() *features.Features {
	yes, no := true, false
	return &features.Features{
		OCIVersionMin: "1.0.0",
		OCIVersionMax: specs.Version,
		Hooks:         []string{"prestart", "createRuntime", "poststart", "poststop"},
		MountOptions:  MountOptions(),
		Linux: &features.Linux{
			Namespaces: Namespaces(),
			Cgroup:     &features.Cgroup{V1: &no, V2: &yes, Systemd: &no, SystemdUser: &no, Rdma: &no},
			Seccomp:    &features.Seccomp{Enabled: &yes},
			Apparmor:   &features.Apparmor{Enabled: &no},
			Selinux:    &features.Selinux{Enabled: &no},
			IntelRdt:   &features.IntelRdt{Enabled: &no},
			MountExtensions: &features.MountExtensions{
				IDMap: &features.IDMap{Enabled: &yes},
			},
		},
	}
}
