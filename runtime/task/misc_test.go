package task

import (
	"context"
	"math"
	"testing"

	"github.com/containerd/containerd/api/types/runc/options"
	runtimeoptions "github.com/containerd/containerd/api/types/runtimeoptions/v1"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/shutdown"
	"github.com/containerd/errdefs"
	"github.com/containerd/typeurl/v2"
	"github.com/sirupsen/logrus"

	"github.com/kiln-runtime/kiln/config"
	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
	"github.com/kiln-runtime/kiln/runtime/standin"
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
	if m.CPU.PSI != nil || m.Memory.PSI != nil || m.Io.PSI != nil {
		t.Errorf("pressure reported without the guest's: %+v %+v %+v", m.CPU.PSI, m.Memory.PSI, m.Io.PSI)
	}
}

// Peaks and pressure reach containerd's metrics; a pressure average that is no share of time (the guest writes
// them) reads as 0.
func TestMetricsPressureAndPeaks(t *testing.T) {
	m := metrics(&agentv1.StatsContainerResponse{
		Memory: &agentv1.MemoryStats{MaxUsage: 1 << 20, SwapMaxUsage: 2 << 20,
			Psi: &agentv1.PSIStats{Some: &agentv1.PSIData{Avg10: 12.5, Avg60: math.NaN(), Avg300: math.Inf(1), Total: 42}, Full: &agentv1.PSIData{Avg10: -1, Avg60: 101}}},
		Cpu: &agentv1.CPUStats{Psi: &agentv1.PSIStats{Some: &agentv1.PSIData{Avg300: 100}}},
		Io:  &agentv1.IOStats{Psi: &agentv1.PSIStats{Full: &agentv1.PSIData{Total: 9}}},
	})
	if m.Memory.MaxUsage != 1<<20 || m.Memory.SwapMaxUsage != 2<<20 {
		t.Errorf("peaks %d, %d", m.Memory.MaxUsage, m.Memory.SwapMaxUsage)
	}
	some, full := m.Memory.PSI.Some, m.Memory.PSI.Full
	if some.Avg10 != 12.5 || some.Avg60 != 0 || some.Avg300 != 0 || some.Total != 42 || full.Avg10 != 0 || full.Avg60 != 0 {
		t.Errorf("memory pressure %+v / %+v", some, full)
	}
	if m.CPU.PSI.Some.Avg300 != 100 || m.CPU.PSI.Full != nil || m.Io.PSI.Full.Total != 9 || m.Io.PSI.Some != nil {
		t.Errorf("cpu pressure %+v, io pressure %+v", m.CPU.PSI, m.Io.PSI)
	}
}

// runtime.log_level sets the shim's level, quieter or louder than containerd's info; containerd's debug and
// agent.debug raise it to debug, never lower it.
func TestShimLogLevel(t *testing.T) {
	for _, c := range []struct {
		level      string
		agentDebug bool
		containerd logrus.Level
		want       logrus.Level
	}{
		{"info", false, logrus.InfoLevel, logrus.InfoLevel},
		{"warn", false, logrus.InfoLevel, logrus.WarnLevel},
		{"error", false, logrus.InfoLevel, logrus.ErrorLevel},
		{"debug", false, logrus.InfoLevel, logrus.DebugLevel},
		{"trace", false, logrus.InfoLevel, logrus.TraceLevel},
		{"warn", true, logrus.InfoLevel, logrus.DebugLevel},
		{"trace", true, logrus.InfoLevel, logrus.TraceLevel},
		{"warn", false, logrus.DebugLevel, logrus.DebugLevel},
		{"trace", false, logrus.DebugLevel, logrus.TraceLevel},
		{"bogus", false, logrus.InfoLevel, logrus.InfoLevel},
	} {
		cfg := config.Default()
		cfg.Runtime.LogLevel, cfg.Agent.Debug = c.level, c.agentDebug
		if got := shimLogLevel(cfg, c.containerd); got != c.want {
			t.Errorf("log_level %q, agent.debug %v, containerd at %s: %s, want %s", c.level, c.agentDebug, c.containerd, got, c.want)
		}
	}
}

// A spare shim's task service keeps its stand-ins in the spare's pool, where its pod's are; a shim with no spare
// opens one of its own.
func TestNewServiceStandIns(t *testing.T) {
	ctx, cancel := context.WithCancel(namespaces.WithNamespace(context.Background(), "test"))
	defer cancel()
	ctx, sd := shutdown.WithShutdown(ctx)
	pub := &stalledPublisher{release: make(chan struct{}), closed: make(chan struct{})}
	spares, err := standin.NewPool()
	if err != nil {
		t.Fatal(err)
	}
	s, err := NewService(ctx, pub, sd, "test", spares)
	if err != nil {
		t.Fatal(err)
	}
	if s.standIns != spares {
		t.Error("the task service opened a pool of its own beside the spare's")
	}
	s, err = NewService(ctx, pub, sd, "test", nil)
	if err != nil {
		t.Fatal(err)
	}
	if s.standIns == nil || s.standIns == spares {
		t.Errorf("a task service with no spare has pool %p", s.standIns)
	}
}
