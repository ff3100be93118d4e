package pod

import (
	"testing"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
)

func TestPodShm(t *testing.T) {
	mounts := []specs.Mount{
		{Destination: "/proc", Type: "proc", Source: "proc"},
		{Destination: "/dev/shm", Type: "bind", Source: "/run/containerd/cri/sandboxes/x/shm", Options: []string{"rbind", "ro"}},
		{Destination: "/etc/hosts", Type: "bind", Source: "/var/lib/cri/x/hosts", Options: []string{"rbind"}},
		{Destination: "/dev/shm/", Source: "/elsewhere", Options: []string{"bind"}},
	}
	shm := podShm(mounts)
	if len(shm) != 2 || shm[1].Source != agentv1.GuestPodShm || shm[3].Source != agentv1.GuestPodShm || shm[1].Options[1] != "ro" {
		t.Fatalf("pod shm mounts %+v", shm)
	}
	if mounts[1].Type != "tmpfs" || mounts[2].Source != "/var/lib/cri/x/hosts" || mounts[0].Type != "proc" {
		t.Errorf("mounts left for sharing %+v", mounts)
	}
}

func TestProcNSPid(t *testing.T) {
	for path, want := range map[string]int{
		"/proc/42/ns/net": 42, "/proc/0/ns/net": 0, "/proc/x/ns/net": 0, "/var/run/netns/a": 0, "/proc/42/ns/ipc": 0,
	} {
		got, ok := procNSPid(path, "net")
		if got != want && ok || ok != (want > 0) {
			t.Errorf("%s: %d %v, want %d", path, got, ok, want)
		}
	}
}
