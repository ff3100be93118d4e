// Package hostlsm decides what becomes of a spec's host LSM settings: an AppArmor profile, SELinux labels. They
// name policy loaded in the host's kernel; a Kiln container runs on its guest's kernel, which has none, and
// libcontainer in the guest would fail to apply a profile (or, for a mount label, pass it by). The operator
// chooses (runtime.host_lsm): refuse such a container, naming the field, or take the settings out and run it
// unconfined by them inside its VM, which is its boundary. The default profiles container engines put on every
// container of a host where AppArmor is on (Ubuntu; Debian with AppArmor installed) are no choice of the user's:
// they are taken out either way (noPolicy).
package hostlsm

import (
	"fmt"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// Spec refuses a container's spec that sets host LSM settings, naming them, before anything boots for it; with
// ignore (runtime.host_lsm = "ignore") it takes them out of spec instead (replacing its Process and Linux by
// copies, so that the bundle's spec stays as it was) and returns the fields it took, for the caller's log.
func Spec(ignore bool, spec *specs.Spec) ([]string, error) {
	var fields []string
	if spec.Process != nil {
		fields = processFields(spec.Process, "process.")
	}
	if spec.Linux != nil && spec.Linux.MountLabel != "" {
		fields = append(fields, "linux.mountLabel")
	}
	if len(fields) > 0 && !ignore {
		return nil, refused(fields)
	}
	// A profile that is no policy (noPolicy) goes too, without a word: libcontainer would try to apply even
	// "unconfined".
	if p := spec.Process; p != nil && (p.ApparmorProfile != "" || p.SelinuxLabel != "") {
		c := *p
		c.ApparmorProfile, c.SelinuxLabel = "", ""
		spec.Process = &c
	}
	if spec.Linux != nil && spec.Linux.MountLabel != "" {
		l := *spec.Linux
		l.MountLabel = ""
		spec.Linux = &l
	}
	return fields, nil
}

// Process is Spec for an exec's process spec, which it changes in place.
func Process(ignore bool, p *specs.Process) ([]string, error) {
	fields := processFields(p, "")
	if len(fields) > 0 && !ignore {
		return nil, refused(fields)
	}
	p.ApparmorProfile, p.SelinuxLabel = "", ""
	return fields, nil
}

// noPolicy says whether an AppArmor profile asks for nothing a Kiln container lacks: "unconfined", which confines
// nothing (Docker's for a privileged container), or the default profile a container engine puts on a container
// that asked for none (a Kubernetes pod's RuntimeDefault: containerd's CRI; nerdctl; Docker), the engine's
// stand-in for the runtime's default confinement, which for a Kiln container is its VM. Such profiles are taken
// out without a word; a profile the user named is policy they chose, refused unless runtime.host_lsm = "ignore".
func noPolicy(profile string) bool {
	switch profile {
	case "unconfined", "cri-containerd.apparmor.d", "nerdctl-default", "docker-default":
		return true
	}
	return false
}

func processFields(p *specs.Process, prefix string) []string {
	var fields []string
	if p.ApparmorProfile != "" && !noPolicy(p.ApparmorProfile) {
		fields = append(fields, fmt.Sprintf("%sapparmorProfile %q", prefix, p.ApparmorProfile))
	}
	if p.SelinuxLabel != "" {
		fields = append(fields, fmt.Sprintf("%sselinuxLabel %q", prefix, p.SelinuxLabel))
	}
	return fields
}

func refused(fields []string) error {
	return fmt.Errorf("%w: %v: host LSM policy (AppArmor, SELinux) does not reach a Kiln container, which runs on its VM's kernel: "+
		"set runtime.host_lsm = \"ignore\" in Kiln's configuration to run it unconfined by them inside its VM, or leave them out "+
		"(a Kubernetes pod's appArmorProfile RuntimeDefault or Unconfined; containerd's enable_selinux off)",
		errdefs.ErrInvalidArgument, fields)
}
