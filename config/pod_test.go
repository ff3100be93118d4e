package config

import (
	"slices"
	"strings"
	"testing"
)

func TestForPod(t *testing.T) {
	base := Default()
	base.Hypervisor.VCPUs, base.Hypervisor.MemoryMiB = 1, 256
	allowAll := base
	allowAll.Runtime.EnableAnnotations = []string{"io.kiln.*"}
	allowVCPUs := base
	allowVCPUs.Runtime.EnableAnnotations = []string{AnnotationVCPUs}
	for _, tc := range []struct {
		name        string
		cfg         Config
		annotations map[string]string
		vcpus, mib  int
		params      []string
		err         string
	}{
		{name: "no annotations", cfg: base, vcpus: 1, mib: 256},
		{name: "CRI resources", cfg: base, annotations: map[string]string{
			CRISandboxCPUQuota: "150000", CRISandboxCPUPeriod: "100000", CRISandboxMemory: "268435456", CRISandboxCPUShares: "1024",
		}, vcpus: 3, mib: 512},
		{name: "memory rounds up to a MiB", cfg: base, annotations: map[string]string{CRISandboxMemory: "1048577"}, vcpus: 1, mib: 258},
		{name: "quota without period", cfg: base, annotations: map[string]string{CRISandboxCPUQuota: "100000"}, vcpus: 1, mib: 256},
		{name: "bad CRI value", cfg: base, annotations: map[string]string{CRISandboxMemory: "lots"}, err: CRISandboxMemory},
		{name: "kiln annotations refused by default", cfg: base, annotations: map[string]string{AnnotationVCPUs: "2"}, err: "runtime.enable_annotations"},
		{name: "kiln annotations allowed", cfg: allowAll, annotations: map[string]string{
			AnnotationVCPUs: "2", AnnotationMemoryMiB: "1024", AnnotationKernelParams: "a=1 b", CRISandboxMemory: "1048576",
		}, vcpus: 2, mib: 1025, params: []string{"a=1", "b"}},
		{name: "only the allowed one", cfg: allowVCPUs, annotations: map[string]string{AnnotationVCPUs: "2", AnnotationMemoryMiB: "512"}, err: AnnotationMemoryMiB},
		{name: "unknown kiln annotation", cfg: allowAll, annotations: map[string]string{"io.kiln.colour": "blue"}, err: "io.kiln.colour"},
		// Found by FuzzForPod: an annotation out of range was accepted when the pod's resources brought the sum
		// back into range, and ceil(quota/period) overflowed to 0 for quotas near 2^63.
		{name: "negative vCPUs annotation", cfg: allowAll, annotations: map[string]string{
			AnnotationVCPUs: "-5", CRISandboxCPUQuota: "1000000", CRISandboxCPUPeriod: "100000"}, err: AnnotationVCPUs},
		{name: "memory annotation below a VM's minimum", cfg: allowAll, annotations: map[string]string{
			AnnotationMemoryMiB: "-100", CRISandboxMemory: "536870912"}, err: AnnotationMemoryMiB},
		{name: "huge quota rounds up without overflowing", cfg: base, annotations: map[string]string{
			CRISandboxCPUQuota: "9223372036854775807", CRISandboxCPUPeriod: "9223372036854775807"}, vcpus: 2, mib: 256},
		{name: "huge memory is refused", cfg: base, annotations: map[string]string{CRISandboxMemory: "9223372036854775807"},
			err: "MiB of memory"},
		{name: "too big", cfg: allowAll, annotations: map[string]string{AnnotationVCPUs: "64", CRISandboxCPUQuota: "100000", CRISandboxCPUPeriod: "100000"}, err: "64 + 1 vCPUs"},
		{name: "more vCPUs than the guest kernel brings up", cfg: allowAll, annotations: map[string]string{AnnotationVCPUs: "65"}, err: AnnotationVCPUs},
		// The operator's ceiling on growth bounds what a pod asks for at its boot.
		{name: "memory above memory_max_mib", cfg: allowAll, annotations: map[string]string{AnnotationMemoryMiB: "1048576"}, err: "memory_max_mib"},
		{name: "memory up to memory_max_mib", cfg: allowAll, annotations: map[string]string{AnnotationMemoryMiB: "8192"}, vcpus: 1, mib: 8192},
		{name: "kernel parameters that end the kernel's", cfg: allowAll, annotations: map[string]string{AnnotationKernelParams: "quiet -- init=/bin/sh"}, err: `"--"`},
		{name: "kernel parameter with an open quote", cfg: allowAll, annotations: map[string]string{AnnotationKernelParams: `x="a`}, err: "quote"},
		// Limits near the top of int64 must not wrap around into a small (or negative) VM.
		{name: "huge memory limit", cfg: base, annotations: map[string]string{CRISandboxMemory: "9223372036854775807"},
			err: "256 + 8796093022208 MiB of memory"},
		{name: "huge CPU quota", cfg: base, annotations: map[string]string{CRISandboxCPUQuota: "9223372036854775807", CRISandboxCPUPeriod: "1"},
			err: "1 + 9223372036854775807 vCPUs"},
		{name: "negative CRI value", cfg: base, annotations: map[string]string{CRISandboxMemory: "-5"}, err: CRISandboxMemory},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := tc.cfg.ForPod(tc.annotations)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("err %v, want one naming %q", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got.Hypervisor.VCPUs != tc.vcpus || got.Hypervisor.MemoryMiB != tc.mib || !slices.Equal(got.Hypervisor.KernelParams, tc.params) {
				t.Errorf("vcpus %d memory %d params %q, want %d %d %q", got.Hypervisor.VCPUs, got.Hypervisor.MemoryMiB, got.Hypervisor.KernelParams, tc.vcpus, tc.mib, tc.params)
			}
		})
	}
}
