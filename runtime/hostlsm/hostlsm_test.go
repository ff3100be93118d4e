package hostlsm

import (
	"reflect"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// A spec that names host LSM policy is refused, naming each field, unless the settings are ignored: then they
// are taken out of the spec the guest gets and the bundle's spec keeps them. "unconfined" and the engines' default
// AppArmor profiles are no policy: taken out without a word.
func TestSpec(t *testing.T) {
	for _, c := range []struct {
		name     string
		process  specs.Process
		linux    specs.Linux
		fields   []string
		refusing bool
	}{
		{name: "none"},
		{name: "unconfined", process: specs.Process{ApparmorProfile: "unconfined"}},
		{name: "CRI's default profile", process: specs.Process{ApparmorProfile: "cri-containerd.apparmor.d"}},
		{name: "nerdctl's default profile", process: specs.Process{ApparmorProfile: "nerdctl-default"}},
		{name: "Docker's default profile", process: specs.Process{ApparmorProfile: "docker-default"}},
		{name: "AppArmor", process: specs.Process{ApparmorProfile: "kiln-test-profile"},
			fields: []string{`process.apparmorProfile "kiln-test-profile"`}, refusing: true},
		{name: "SELinux", process: specs.Process{SelinuxLabel: "system_u:system_r:container_t:s0"}, linux: specs.Linux{MountLabel: "system_u:object_r:container_file_t:s0"},
			fields: []string{`process.selinuxLabel "system_u:system_r:container_t:s0"`, "linux.mountLabel"}, refusing: true},
	} {
		t.Run(c.name, func(t *testing.T) {
			bundleProcess, bundleLinux := c.process, c.linux
			spec := &specs.Spec{Process: &bundleProcess, Linux: &bundleLinux}
			if _, err := Spec(false, &specs.Spec{Process: &specs.Process{ApparmorProfile: c.process.ApparmorProfile, SelinuxLabel: c.process.SelinuxLabel}, Linux: &specs.Linux{MountLabel: c.linux.MountLabel}}); (err != nil) != c.refusing {
				t.Fatalf("refusing: %v, want an error %v", err, c.refusing)
			} else if err != nil {
				if !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), "runtime.host_lsm") {
					t.Errorf("refusal %v: want an invalid argument naming runtime.host_lsm", err)
				}
				for _, f := range c.fields {
					if !strings.Contains(err.Error(), f) {
						t.Errorf("refusal %v does not name %s", err, f)
					}
				}
			}
			fields, err := Spec(true, spec)
			if err != nil || !reflect.DeepEqual(fields, c.fields) {
				t.Fatalf("ignoring: %v, %v; want %v", fields, err, c.fields)
			}
			if spec.Process.ApparmorProfile != "" || spec.Process.SelinuxLabel != "" || spec.Linux.MountLabel != "" {
				t.Errorf("the guest's spec keeps %+v, %+v", spec.Process, spec.Linux)
			}
			if !reflect.DeepEqual(bundleProcess, c.process) || bundleLinux.MountLabel != c.linux.MountLabel {
				t.Errorf("the bundle's spec changed: %+v, %+v", bundleProcess, bundleLinux)
			}
		})
	}
}

// An exec's process spec is refused or changed in place in the same way.
func TestProcess(t *testing.T) {
	p := specs.Process{ApparmorProfile: "kiln-test-profile"}
	if _, err := Process(false, &p); err == nil || !strings.Contains(err.Error(), `apparmorProfile "kiln-test-profile"`) {
		t.Errorf("refusing an exec's profile: %v", err)
	}
	if fields, err := Process(true, &p); err != nil || len(fields) != 1 || p.ApparmorProfile != "" {
		t.Errorf("ignoring an exec's profile: %v, %v, left %q", fields, err, p.ApparmorProfile)
	}
	p = specs.Process{ApparmorProfile: "cri-containerd.apparmor.d"}
	if fields, err := Process(false, &p); err != nil || len(fields) != 0 || p.ApparmorProfile != "" {
		t.Errorf("an exec with CRI's default profile: %v, %v, left %q", fields, err, p.ApparmorProfile)
	}
}
