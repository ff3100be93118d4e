package network

import (
	"errors"
	"testing"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

func TestSourceOf(t *testing.T) {
	for _, tc := range []struct {
		name string
		spec specs.Spec
		want Source
		ok   bool
	}{
		{"new namespace", specs.Spec{Linux: &specs.Linux{Namespaces: []specs.LinuxNamespace{{Type: specs.NetworkNamespace}}}}, Source{New: true}, true},
		{"path", specs.Spec{Linux: &specs.Linux{Namespaces: []specs.LinuxNamespace{{Type: specs.PIDNamespace}, {Type: specs.NetworkNamespace, Path: "/var/run/netns/x"}}}}, Source{Path: "/var/run/netns/x"}, true},
		{"host network", specs.Spec{Linux: &specs.Linux{Namespaces: []specs.LinuxNamespace{{Type: specs.PIDNamespace}}}}, Source{}, false},
		{"no linux section", specs.Spec{}, Source{}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := SourceOf(&tc.spec)
			if (err == nil) != tc.ok || got != tc.want {
				t.Fatalf("got %+v, %v", got, err)
			}
			if err != nil && !errors.Is(err, errdefs.ErrInvalidArgument) {
				t.Errorf("err %v is not InvalidArgument", err)
			}
		})
	}
}
