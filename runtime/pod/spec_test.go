package pod

import (
	"fmt"
	"os"
	"reflect"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
)

// Only CRI's pod shm (the sandbox's shm tmpfs, bound at /dev/shm) becomes the guest's pod shm; another bind at
// /dev/shm (an emptyDir volume, the host's own) keeps its source, contents and size, and a spec with no sandbox
// has no pod shm.
func TestPodShm(t *testing.T) {
	cri := "/run/containerd/io.containerd.grpc.v1.cri/sandboxes/sb1/shm"
	for _, c := range []struct {
		name    string
		mount   specs.Mount
		sandbox string
		pod     bool
	}{
		{"CRI's pod shm", specs.Mount{Destination: "/dev/shm", Type: "bind", Source: cri, Options: []string{"rbind", "ro"}}, "sb1", true},
		{"CRI's, bind in options", specs.Mount{Destination: "/dev/shm/", Source: cri + "/", Options: []string{"bind"}}, "sb1", true},
		{"another sandbox's", specs.Mount{Destination: "/dev/shm", Type: "bind", Source: cri, Options: []string{"rbind"}}, "sb2", false},
		{"no sandbox", specs.Mount{Destination: "/dev/shm", Type: "bind", Source: cri, Options: []string{"rbind"}}, "", false},
		{"an emptyDir volume", specs.Mount{Destination: "/dev/shm", Type: "bind", Source: "/var/lib/kubelet/pods/p/volumes/kubernetes.io~empty-dir/dshm", Options: []string{"rbind"}}, "sb1", false},
		{"the host's /dev/shm", specs.Mount{Destination: "/dev/shm", Type: "bind", Source: "/dev/shm", Options: []string{"rbind"}}, "sb1", false},
		{"elsewhere", specs.Mount{Destination: "/dev/shm2", Type: "bind", Source: cri, Options: []string{"rbind"}}, "sb1", false},
		{"a tmpfs", specs.Mount{Destination: "/dev/shm", Type: "tmpfs", Source: "shm"}, "sb1", false},
	} {
		t.Run(c.name, func(t *testing.T) {
			mounts := []specs.Mount{{Destination: "/proc", Type: "proc", Source: "proc"}, c.mount}
			guest := podShm(mounts, c.sandbox)
			if !c.pod {
				if guest(1) || !reflect.DeepEqual(mounts[1], c.mount) {
					t.Errorf("pod shm %v, mount left %+v; want none and the mount as it was", guest(1), mounts[1])
				}
				return
			}
			want := c.mount
			want.Source = agentv1.GuestPodShm
			if !guest(1) || guest(0) || !reflect.DeepEqual(mounts[1], want) || mounts[0].Type != "proc" {
				t.Errorf("pod shm at 1: %v, at 0: %v; mounts %+v, want %+v at 1", guest(1), guest(0), mounts, want)
			}
		})
	}
}

// A spec without a pid or an ipc namespace (host PID, host IPC) is refused before anything boots, naming what
// to remove; a pod's containers joining another's namespaces by path pass.
func TestCheckIsolation(t *testing.T) {
	ns := func(types ...specs.LinuxNamespaceType) *specs.Spec {
		s := &specs.Spec{Linux: &specs.Linux{}}
		for _, t := range types {
			s.Linux.Namespaces = append(s.Linux.Namespaces, specs.LinuxNamespace{Type: t})
		}
		return s
	}
	joined := ns(specs.NetworkNamespace, specs.MountNamespace)
	joined.Linux.Namespaces = append(joined.Linux.Namespaces,
		specs.LinuxNamespace{Type: specs.PIDNamespace, Path: "/proc/42/ns/pid"}, specs.LinuxNamespace{Type: specs.IPCNamespace, Path: "/proc/42/ns/ipc"},
		specs.LinuxNamespace{Type: specs.UTSNamespace, Path: "/proc/42/ns/uts"})
	for _, c := range []struct {
		name string
		spec *specs.Spec
		want string
	}{
		{"own namespaces", ns(specs.PIDNamespace, specs.IPCNamespace, specs.UTSNamespace, specs.NetworkNamespace), ""},
		{"another container's", joined, ""},
		{"host PID", ns(specs.IPCNamespace, specs.UTSNamespace, specs.NetworkNamespace), "hostPID"},
		{"host IPC", ns(specs.PIDNamespace, specs.UTSNamespace, specs.NetworkNamespace), "hostIPC"},
		{"host UTS", ns(specs.PIDNamespace, specs.IPCNamespace, specs.NetworkNamespace), "--uts=host"},
		{"no linux section", &specs.Spec{}, "hostPID"},
	} {
		t.Run(c.name, func(t *testing.T) {
			err := checkIsolation(c.spec)
			if c.want == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), c.want) {
				t.Errorf("checkIsolation = %v, want an invalid argument naming %s", err, c.want)
			}
		})
	}
}

// A process pinned to host CPUs (execCPUAffinity) is refused, as a cpuset is.
func TestCheckProcess(t *testing.T) {
	for _, tc := range []struct {
		name string
		p    *specs.Process
		want string
	}{
		{"a program", &specs.Process{Args: []string{"sh"}, Cwd: "/"}, ""},
		{"no cwd", &specs.Process{Args: []string{"sh"}}, ""},
		{"none", nil, ""},
		{"host CPUs", &specs.Process{Args: []string{"sh"}, ExecCPUAffinity: &specs.CPUAffinity{Initial: "0", Final: "1"}}, "execCPUAffinity"},
		{"no args", &specs.Process{Cwd: "/"}, "args is empty"},
		{"a relative cwd", &specs.Process{Args: []string{"sh"}, Cwd: "work"}, `cwd "work"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := CheckProcess(tc.p)
			if tc.want == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("CheckProcess = %v, want an invalid argument naming %q", err, tc.want)
			}
		})
	}
}

// Host network interfaces, NUMA memory policies and seccomp agents name host things the VM has not: refused,
// naming the field.
func TestCheckHostDevices(t *testing.T) {
	for _, tc := range []struct {
		name  string
		linux *specs.Linux
		want  string
	}{
		{"none", &specs.Linux{}, ""},
		{"no linux", nil, ""},
		{"net devices", &specs.Linux{NetDevices: map[string]specs.LinuxNetDevice{"eth1": {Name: "net1"}}}, "linux.netDevices"},
		{"memory policy", &specs.Linux{MemoryPolicy: &specs.LinuxMemoryPolicy{Mode: specs.MpolBind, Nodes: "0"}}, "linux.memoryPolicy"},
		{"seccomp without notify", &specs.Linux{Seccomp: &specs.LinuxSeccomp{DefaultAction: specs.ActErrno, Syscalls: []specs.LinuxSyscall{{Names: []string{"read"}, Action: specs.ActAllow}}}}, ""},
		{"seccomp notify", &specs.Linux{Seccomp: &specs.LinuxSeccomp{DefaultAction: specs.ActAllow, ListenerPath: "/run/seccomp-agent.sock", Syscalls: []specs.LinuxSyscall{{Names: []string{"mkdir"}, Action: specs.ActNotify}}}}, "listenerPath \"/run/seccomp-agent.sock\""},
		{"seccomp notify by default", &specs.Linux{Seccomp: &specs.LinuxSeccomp{DefaultAction: specs.ActNotify}}, "SCMP_ACT_NOTIFY"},
		{"seccomp listener without notify", &specs.Linux{Seccomp: &specs.LinuxSeccomp{DefaultAction: specs.ActAllow, ListenerPath: "/run/a.sock"}}, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := checkHostDevices(&specs.Spec{Linux: tc.linux})
			if tc.want == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("checkHostDevices = %v, want an invalid argument naming %q", err, tc.want)
			}
		})
	}
}

// Mounts that propagate from the container back to the host (CRI's Bidirectional) are refused, naming the field;
// those that propagate from the host into the container (HostToContainer, rslave) or not at all pass.
func TestCheckPropagation(t *testing.T) {
	for _, c := range []struct {
		name string
		spec *specs.Spec
		want string
	}{
		{"none", &specs.Spec{Mounts: []specs.Mount{{Destination: "/v", Type: "bind", Options: []string{"rbind", "rprivate"}}}}, ""},
		{"host to container", &specs.Spec{Linux: &specs.Linux{RootfsPropagation: "rslave"},
			Mounts: []specs.Mount{{Destination: "/v", Type: "bind", Options: []string{"rbind", "rslave"}}}}, ""},
		{"bidirectional mount", &specs.Spec{Mounts: []specs.Mount{{Destination: "/etc/hosts", Type: "bind"},
			{Destination: "/var/lib/kubelet/pods", Type: "bind", Options: []string{"rbind", "rshared"}}}}, "mounts[1] (/var/lib/kubelet/pods)"},
		{"shared root", &specs.Spec{Linux: &specs.Linux{RootfsPropagation: "rshared"}}, "linux.rootfsPropagation"},
	} {
		t.Run(c.name, func(t *testing.T) {
			err := checkPropagation(c.spec)
			if c.want == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), c.want) {
				t.Errorf("checkPropagation = %v, want an invalid argument naming %s", err, c.want)
			}
		})
	}
}

func TestProcNSPid(t *testing.T) {
	for path, want := range map[string]int{
		"/proc/42/ns/net": 42, "/proc/0/ns/net": 0, "/proc/x/ns/net": 0, "/var/run/netns/a": 0, "/proc/42/ns/ipc": 0,
		"/proc//42/./ns/net": 42, "/proc/x/task/43/ns/net": 0, "/proc/42/task/x/ns/net": 0, "/proc/+42/ns/net": 0,
		"/proc/42/ns/net/x": 0, "/proc/42/tasks/43/ns/net": 0,
		// The task form names a thread of the process: this test's own, and not one of another process.
		fmt.Sprintf("/proc/%d/task/%d/ns/net", os.Getpid(), os.Getpid()): os.Getpid(),
		fmt.Sprintf("/proc/%d/task/%d/ns/ipc", os.Getpid(), os.Getpid()): 0,
		fmt.Sprintf("/proc/1/task/%d/ns/net", os.Getpid()):               0,
		fmt.Sprintf("/proc/0/task/%d/ns/net", os.Getpid()):               0,
	} {
		got, ok := procNSPid(path, "net")
		if got != want && ok || ok != (want > 0) {
			t.Errorf("%s: %d %v, want %d", path, got, ok, want)
		}
	}
}
