package pod

import (
	"context"
	"errors"
	"math"
	"testing"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/kiln-runtime/kiln/config"
	"github.com/kiln-runtime/kiln/runtime/bundle"
)

func ptr[T any](v T) *T { return &v }

func TestSizeFor(t *testing.T) {
	cfg := config.Default()
	cfg.Hypervisor.VCPUs, cfg.Hypervisor.MemoryMiB = 1, 256
	for _, tc := range []struct {
		name       string
		spec       specs.Spec
		vcpus, mib int
		invalid    bool
	}{
		{name: "nothing asked", spec: specs.Spec{}, vcpus: 1, mib: 256},
		{name: "CRI sandbox", spec: specs.Spec{Annotations: map[string]string{
			config.CRISandboxCPUQuota: "100000", config.CRISandboxCPUPeriod: "100000", config.CRISandboxMemory: "268435456",
		}}, vcpus: 2, mib: 512},
		{name: "a container's own limits", spec: specs.Spec{Linux: &specs.Linux{Resources: &specs.LinuxResources{
			CPU:    &specs.LinuxCPU{Quota: ptr(int64(250000)), Period: ptr(uint64(100000))},
			Memory: &specs.LinuxMemory{Limit: ptr(int64(128 << 20))},
		}}}, vcpus: 4, mib: 384},
		{name: "CRI annotations win over the pause container's limits", spec: specs.Spec{
			Annotations: map[string]string{config.CRISandboxMemory: "0"},
			Linux:       &specs.Linux{Resources: &specs.LinuxResources{Memory: &specs.LinuxMemory{Limit: ptr(int64(128 << 20))}}},
		}, vcpus: 1, mib: 256},
		{name: "refused annotation", spec: specs.Spec{Annotations: map[string]string{config.AnnotationVCPUs: "4"}}, invalid: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := Size(cfg, &First{ID: "c", Bundle: &bundle.Bundle{Spec: &tc.spec}})
			if tc.invalid {
				if !errors.Is(err, errdefs.ErrInvalidArgument) {
					t.Fatalf("err %v, want InvalidArgument", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got.Hypervisor.VCPUs != tc.vcpus || got.Hypervisor.MemoryMiB != tc.mib {
				t.Errorf("%d vCPUs %d MiB, want %d %d", got.Hypervisor.VCPUs, got.Hypervisor.MemoryMiB, tc.vcpus, tc.mib)
			}
		})
	}
}

func TestFits(t *testing.T) {
	cfg := config.Default()
	cfg.Hypervisor.VCPUs, cfg.Hypervisor.MemoryMiB = 2, 512
	// A VM that cannot grow: one that can asks its guest for more memory (grow_test.go).
	cfg.Hypervisor.MemoryMaxMiB, cfg.Hypervisor.VCPUsMax = 0, 0
	p := &Pod{cfg: cfg}
	for _, tc := range []struct {
		name string
		r    *specs.LinuxResources
		ok   bool
	}{
		{"none", nil, true},
		{"within", &specs.LinuxResources{Memory: &specs.LinuxMemory{Limit: ptr(int64(512 << 20))}, CPU: &specs.LinuxCPU{Quota: ptr(int64(200000)), Period: ptr(uint64(100000))}}, true},
		{"too much memory", &specs.LinuxResources{Memory: &specs.LinuxMemory{Limit: ptr(int64(513 << 20))}}, false},
		{"more memory than any VM", &specs.LinuxResources{Memory: &specs.LinuxMemory{Limit: ptr(int64(math.MaxInt64))}}, false},
		{"more CPU than any VM", &specs.LinuxResources{CPU: &specs.LinuxCPU{Quota: ptr(int64(math.MaxInt64)), Period: ptr(uint64(1))}}, false},
		{"too much CPU", &specs.LinuxResources{CPU: &specs.LinuxCPU{Quota: ptr(int64(200001)), Period: ptr(uint64(100000))}}, false},
		{"host CPUs", &specs.LinuxResources{CPU: &specs.LinuxCPU{Cpus: "0-1"}}, false},
		{"host memory nodes", &specs.LinuxResources{CPU: &specs.LinuxCPU{Mems: "0"}}, false},
		{"huge pages", &specs.LinuxResources{HugepageLimits: []specs.LinuxHugepageLimit{{Pagesize: "2MB", Limit: 2 << 20}}}, false},
		{"block IO weight", &specs.LinuxResources{BlockIO: &specs.LinuxBlockIO{Weight: ptr(uint16(500))}}, false},
		{"block IO throttle", &specs.LinuxResources{BlockIO: &specs.LinuxBlockIO{ThrottleReadBpsDevice: []specs.LinuxThrottleDevice{{Rate: 1 << 20}}}}, false},
		{"empty block IO", &specs.LinuxResources{BlockIO: &specs.LinuxBlockIO{}}, true},
		{"no huge pages (kubelet's)", &specs.LinuxResources{HugepageLimits: []specs.LinuxHugepageLimit{{Pagesize: "2MB"}, {Pagesize: "1GB"}}}, true},
		{"host CPUs as a cgroup v2 file", &specs.LinuxResources{Unified: map[string]string{"cpuset.cpus": "0-1"}}, false},
		{"host memory nodes as a cgroup v2 file", &specs.LinuxResources{Unified: map[string]string{"memory.high": "max", "cpuset.mems": "0"}}, false},
		{"block IO as a cgroup v2 file", &specs.LinuxResources{Unified: map[string]string{"io.weight": "default 500"}}, false},
		{"huge pages as a cgroup v2 file", &specs.LinuxResources{Unified: map[string]string{"hugetlb.2MB.max": "4194304"}}, false},
		{"guest cgroup v2 files", &specs.LinuxResources{Unified: map[string]string{"memory.high": "1000000", "pids.max": "100", "hugetlb.2MB.max": "0", "hugetlb.1GB.max": "max"}}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := p.Fit(context.Background(), "c", tc.r, false)
			if (err == nil) != tc.ok || err != nil && !errors.Is(err, errdefs.ErrInvalidArgument) {
				t.Errorf("err %v, want ok %v", err, tc.ok)
			}
		})
	}
}
