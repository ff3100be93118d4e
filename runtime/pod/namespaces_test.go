package pod

import (
	"errors"
	"fmt"
	"os"
	"reflect"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/kiln-runtime/kiln/runtime/standin"
)

// Namespace paths that name a container of the pod by the pid Kiln reported (its stand-in's) become its init's
// guest pid; other /proc paths, host processes', are refused by name; the network's and non-/proc paths pass
// (checkJoin and the agent judge them); the bundle's spec is not changed.
func TestGuestNamespaces(t *testing.T) {
	guestInit := func(host uint32) (uint32, bool) {
		if host == 4242 || host == uint32(os.Getpid()) {
			return 7, true
		}
		return 0, false
	}
	ns := func(typ specs.LinuxNamespaceType, path string) specs.LinuxNamespace {
		return specs.LinuxNamespace{Type: typ, Path: path}
	}
	for _, c := range []struct {
		name    string
		in, out []specs.LinuxNamespace
		err     string
	}{
		{"own namespaces", []specs.LinuxNamespace{ns(specs.PIDNamespace, ""), ns(specs.MountNamespace, "")}, nil, ""},
		{"CRI's app container",
			[]specs.LinuxNamespace{ns(specs.PIDNamespace, "/proc/4242/ns/pid"), ns(specs.IPCNamespace, "/proc/4242/ns/ipc"), ns(specs.UTSNamespace, "/proc/4242/ns/uts"), ns(specs.NetworkNamespace, "/proc/4242/ns/net"), ns(specs.UserNamespace, "/proc/4242/ns/user"), ns(specs.MountNamespace, "")},
			[]specs.LinuxNamespace{ns(specs.PIDNamespace, "/proc/7/ns/pid"), ns(specs.IPCNamespace, "/proc/7/ns/ipc"), ns(specs.UTSNamespace, "/proc/7/ns/uts"), ns(specs.NetworkNamespace, "/proc/4242/ns/net"), ns(specs.UserNamespace, "/proc/7/ns/user"), ns(specs.MountNamespace, "")}, ""},
		{"a task path", []specs.LinuxNamespace{ns(specs.IPCNamespace, fmt.Sprintf("/proc/%d/task/%[1]d/ns/ipc", os.Getpid()))}, []specs.LinuxNamespace{ns(specs.IPCNamespace, "/proc/7/ns/ipc")}, ""},
		{"a task path of no process", []specs.LinuxNamespace{ns(specs.IPCNamespace, fmt.Sprintf("/proc/1/task/%d/ns/ipc", os.Getpid()))}, nil, ""},
		{"a host process's", []specs.LinuxNamespace{ns(specs.IPCNamespace, "/proc/1/ns/ipc")}, nil, "ipc namespace /proc/1/ns/ipc"},
		{"a guest pid", []specs.LinuxNamespace{ns(specs.PIDNamespace, "/proc/7/ns/pid")}, nil, "pid namespace /proc/7/ns/pid"},
		{"the network's", []specs.LinuxNamespace{ns(specs.NetworkNamespace, "/proc/1/ns/net")}, nil, ""},
		{"a bind-mounted one", []specs.LinuxNamespace{ns(specs.IPCNamespace, "/run/ipcns/x")}, nil, ""},
	} {
		t.Run(c.name, func(t *testing.T) {
			in := specs.Spec{Linux: &specs.Linux{Namespaces: c.in}}
			before := append([]specs.LinuxNamespace(nil), c.in...)
			got, err := guestNamespaces("c1", in, guestInit)
			if c.err != "" {
				if !errors.Is(err, errdefs.ErrInvalidArgument) || !strings.Contains(err.Error(), c.err) {
					t.Fatalf("error %v, want InvalidArgument naming %q", err, c.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			want := c.out
			if want == nil {
				want = c.in
			}
			if !reflect.DeepEqual(got.Linux.Namespaces, want) {
				t.Errorf("namespaces %v, want %v", got.Linux.Namespaces, want)
			}
			if !reflect.DeepEqual(c.in, before) {
				t.Errorf("the bundle's namespaces changed: %v", c.in)
			}
		})
	}
}

// A first container's network namespace named by a thread's pid (another Kiln container's stand-in) is refused;
// a process's, or a path that is not /proc/<pid>[/task/<tid>]/ns/net, passes.
func TestCheckNotStandIn(t *testing.T) {
	pool, err := standin.NewPool()
	if err != nil {
		t.Fatal(err)
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root (a stand-in's chroot)")
	}
	s, err := pool.Start(t.TempDir(), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	for _, thread := range []string{
		fmt.Sprintf("/proc/%d/ns/net", s.Pid()),
		fmt.Sprintf("/proc/%d/task/%d/ns/net", os.Getpid(), s.Pid()),
		fmt.Sprintf("/proc/%d/task/%d/./ns//net", os.Getpid(), s.Pid()),
	} {
		if err := checkNotStandIn(thread); !errors.Is(err, errdefs.ErrInvalidArgument) || !strings.Contains(err.Error(), "another Kiln container's") {
			t.Errorf("%s: %v, want InvalidArgument naming another Kiln container", thread, err)
		}
	}
	for _, ok := range []string{fmt.Sprintf("/proc/%d/ns/net", os.Getpid()), "/var/run/netns/cni-1", "/proc/self/ns/net"} {
		if err := checkNotStandIn(ok); err != nil {
			t.Errorf("%s: %v", ok, err)
		}
	}
}
