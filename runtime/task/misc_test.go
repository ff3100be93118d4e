package task

import (
	"testing"

	"github.com/containerd/containerd/api/types/runc/options"
	runtimeoptions "github.com/containerd/containerd/api/types/runtimeoptions/v1"
	"github.com/containerd/errdefs"
	"github.com/containerd/typeurl/v2"

	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
)

func TestConfigPathFromRuntimeOptions(t *testing.T) {
	a, err := typeurl.MarshalAnyToProto(&runtimeoptions.Options{ConfigPath: "/etc/kiln/test.toml"})
	if err != nil {
		t.Fatal(err)
	}
	if p, err := ConfigPath(a); err != nil || p != "/etc/kiln/test.toml" {
		t.Errorf("configPath = %q, %v", p, err)
	}
	if p, err := ConfigPath(nil); err != nil || p != "" {
		t.Errorf("no options: configPath = %q, %v", p, err)
	}
	wrong, err := typeurl.MarshalAnyToProto(&options.Options{BinaryName: "runc"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ConfigPath(wrong); !errdefs.IsInvalidArgument(err) {
		t.Errorf("runc options: %v, want InvalidArgument", err)
	}
	// What containerd's CRI sends when it starts a container with a user namespace for a runtime without options.
	owner, err := typeurl.MarshalAnyToProto(&options.Options{IoUid: 200000, IoGid: 300000})
	if err != nil {
		t.Fatal(err)
	}
	if p, err := ConfigPath(owner); err != nil || p != "" {
		t.Errorf("runc options with only the stdio owner: configPath = %q, %v", p, err)
	}
}

func TestVMIDIsShortAndStable(t *testing.T) {
	long := "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
	a, b := VMID("k8s.io", long), VMID("k8s.io", long)
	if a != b {
		t.Errorf("VMID not stable: %s vs %s", a, b)
	}
	if len(a) > 24 {
		t.Errorf("VMID %q too long for socket paths", a)
	}
	if VMID("other", long) == a {
		t.Error("VMID ignores the namespace")
	}
}

func TestMetricsMapping(t *testing.T) {
	m := metrics(&agentv1.StatsContainerResponse{
		Memory: &agentv1.MemoryStats{Usage: 4096, UsageLimit: 8192, OomKill: 2},
		Pids:   &agentv1.PidsStats{Current: 3, Limit: 10},
		Cpu:    &agentv1.CPUStats{UsageUsec: 7},
		Io:     &agentv1.IOStats{Usage: []*agentv1.IOEntry{{Major: 8, Rbytes: 5}}},
	})
	if m.Memory.Usage != 4096 || m.Memory.UsageLimit != 8192 || m.MemoryEvents.OomKill != 2 {
		t.Errorf("memory %+v events %+v", m.Memory, m.MemoryEvents)
	}
	if m.Pids.Current != 3 || m.Pids.Limit != 10 || m.CPU.UsageUsec != 7 || m.Io.Usage[0].Rbytes != 5 {
		t.Errorf("metrics %+v", m)
	}
}
