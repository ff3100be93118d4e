package pod

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

func TestGuestUserNamespace(t *testing.T) {
	// This process's own user namespace stands for the one CRI pins on the host.
	hostUserns := "/proc/self/ns/user"
	notNS := filepath.Join(t.TempDir(), "user")
	if err := os.WriteFile(notNS, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	mapping := []specs.LinuxIDMapping{{ContainerID: 0, HostID: 1000, Size: 100000}}
	withUserns := func(path string, maps bool) specs.Spec {
		l := &specs.Linux{Namespaces: []specs.LinuxNamespace{{Type: specs.PIDNamespace}, {Type: specs.UserNamespace, Path: path}}}
		if maps {
			l.UIDMappings, l.GIDMappings = mapping, mapping
		}
		return specs.Spec{Linux: l}
	}
	isInit := func(pid uint32) bool { return pid == 7 }
	cases := []struct {
		name     string
		spec     specs.Spec
		wantPath string
		wantErr  error
	}{
		{"no user namespace", specs.Spec{Linux: &specs.Linux{}}, "", nil},
		{"new one", withUserns("", true), "", nil},
		{"the host's pinned one becomes a new one in the guest", withUserns(hostUserns, true), "", nil},
		{"a pod container's is joined", withUserns("/proc/7/ns/user", true), "/proc/7/ns/user", nil},
		{"a host one without mappings", withUserns(hostUserns, false), "", errdefs.ErrInvalidArgument},
		{"a file that is no namespace", withUserns(notNS, true), "", errdefs.ErrInvalidArgument},
		{"another process's", withUserns("/proc/8/ns/user", true), "", errdefs.ErrInvalidArgument},
		{"root unmapped", func() specs.Spec {
			s := withUserns("", true)
			s.Linux.UIDMappings = []specs.LinuxIDMapping{{ContainerID: 1, HostID: 1000, Size: 100000}}
			s.Process = &specs.Process{}
			return s
		}(), "", errdefs.ErrInvalidArgument},
		{"gid beyond the mapping", func() specs.Spec {
			s := withUserns("", true)
			s.Process = &specs.Process{User: specs.User{GID: 100000}}
			return s
		}(), "", errdefs.ErrInvalidArgument},
		{"mapped user", func() specs.Spec {
			s := withUserns("", true)
			s.Process = &specs.Process{User: specs.User{UID: 99999, GID: 5}}
			return s
		}(), "", nil},
		// The share idmaps a volume with mappings of its own (see share.BindOptions).
		{"an idmapped volume", specs.Spec{Linux: &specs.Linux{}, Mounts: []specs.Mount{{Destination: "/v", Type: "bind", UIDMappings: mapping, GIDMappings: mapping}}}, "", nil},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			before := fmt.Sprint(tc.spec.Linux.Namespaces)
			got, err := guestUserNamespace("c", tc.spec, isInit)
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("error %v, want %v", err, tc.wantErr)
			}
			if after := fmt.Sprint(tc.spec.Linux.Namespaces); after != before {
				t.Errorf("the caller's spec changed: %s, was %s", after, before)
			}
			if err != nil {
				return
			}
			for _, n := range got.Linux.Namespaces {
				if n.Type == specs.UserNamespace && n.Path != tc.wantPath {
					t.Errorf("user namespace path %q, want %q", n.Path, tc.wantPath)
				}
			}
		})
	}
}
