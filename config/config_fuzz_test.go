package config

import (
	"math/big"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
)

// FuzzLoad loads arbitrary files as the configuration. Each either fails with an error that names the file, or
// gives a configuration that passes Validate, whose settings can be listed with their origin, and that sizes a
// pod without annotations as configured.
func FuzzLoad(f *testing.F) {
	shipped, err := os.ReadFile("config.toml")
	if err != nil {
		f.Fatal(err)
	}
	for _, seed := range []string{
		string(shipped),
		"",
		"[hypervisor]\nvcpus = 2\nmemory_mib = 512\naccelerator = \"tcg\"\nkernel_params = [\"quiet\"]\n",
		"[hypervisor]\nvcpus = 0\n",
		"[hypervisor]\nvcpus = 9223372036854775807\nmemory_mib = -1\n",
		"[hypervisor]\nstop_timeout = \"-1s\"\n[agent]\ndial_timeout = \"0s\"\n",
		"[hypervisor]\nstop_timeout = 5\n",
		"[hypervisor]\nuser = \"root\"\n",
		"[hypervisor]\nuser = \"65534:nogroup\"\ncgroup = false\nmemory_overhead_mib = 64\n",
		"[hypervisor]\nkernel = \"/nonexistent/vmlinuz\"\n",
		"[vsock]\nmode = \"vhost-user\"\n[shared_fs]\ncache = \"never\"\n",
		"[runtime]\nenable_annotations = [\"io.kiln.*\", \"other\"]\nlog_level = \"loud\"\nstate_dir = \"relative\"\n",
		"[runtime]\nunknown = 1\n",
		"[[hypervisor]]\nvcpus = 1\n",
		"hypervisor = 3\n",
		"[hypervisor\n",
		"[hypervisor]\nvcpus = 1\nvcpus = 2\n",
		"[hypervisor.extra]\na = 1\n",
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		path := filepath.Join(t.TempDir(), "config.toml")
		if err := os.WriteFile(path, data, 0o600); err != nil {
			t.Fatal(err)
		}
		cfg, err := load(path, "", filepath.Join(t.TempDir(), "none.toml"))
		if err != nil {
			if !strings.HasPrefix(err.Error(), "config "+path+": ") && !strings.HasPrefix(err.Error(), "read config "+path) {
				t.Fatalf("error does not name the file: %v", err)
			}
			return
		}
		if cfg.Source != path {
			t.Fatalf("Source = %q, want %q", cfg.Source, path)
		}
		if err := cfg.Validate(); err != nil {
			t.Fatalf("Load returned a configuration that does not validate: %v", err)
		}
		settings, err := cfg.Settings()
		if err != nil {
			t.Fatalf("Settings of a loaded configuration: %v", err)
		}
		for _, s := range settings {
			if s.Source != path && s.Source != "default" {
				t.Fatalf("setting %s comes from %q", s.Key, s.Source)
			}
		}
		pod, err := cfg.ForPod(nil)
		if err != nil {
			t.Fatalf("ForPod without annotations: %v", err)
		}
		if pod.Hypervisor.VCPUs != cfg.Hypervisor.VCPUs || pod.Hypervisor.MemoryMiB != cfg.Hypervisor.MemoryMiB {
			t.Fatalf("ForPod without annotations made %d vCPUs %d MiB of %d %d", pod.Hypervisor.VCPUs,
				pod.Hypervisor.MemoryMiB, cfg.Hypervisor.VCPUs, cfg.Hypervisor.MemoryMiB)
		}
	})
}

// FuzzForPod sizes pods from arbitrary annotation values and checks the result against exact arithmetic: the
// VM gets the configured (or annotated) size plus ceil(quota/period) vCPUs and ceil(memory/MiB) MiB, and is
// refused, naming why, whenever an annotation is malformed or the result leaves a VM's range.
func FuzzForPod(f *testing.F) {
	f.Add("", "", "", "", "", "", "")
	f.Add("2", "1024", "a=1 b", "150000", "100000", "268435456", "")
	f.Add("-5", "", "", "1000000", "100000", "", "")
	f.Add("", "-100", "", "", "", "536870912", "")
	f.Add("", "", "", "9223372036854775807", "9223372036854775807", "9223372036854775807", "")
	f.Add("", "", "", "9223372036854775807", "9223372036854775807", "", "")
	f.Add("255", "", "", "1", "1", "", "")
	f.Add("x", "1e3", "", "-1", "0", "lots", "io.kiln.colour")
	f.Fuzz(func(t *testing.T, vcpus, mib, params, quota, period, memory, extraKey string) {
		base := Default()
		base.Runtime.EnableAnnotations = []string{"io.kiln.*"}
		ann := map[string]string{}
		set := func(k, v string) {
			if v != "" {
				ann[k] = v
			}
		}
		set(AnnotationVCPUs, vcpus)
		set(AnnotationMemoryMiB, mib)
		set(AnnotationKernelParams, params)
		set(CRISandboxCPUQuota, quota)
		set(CRISandboxCPUPeriod, period)
		set(CRISandboxMemory, memory)
		if extraKey != "" {
			ann[extraKey] = "1"
		}
		got, err := base.ForPod(ann)

		// The model: what the annotations ask for, in exact arithmetic.
		ok := true
		wantVCPUs := big.NewInt(int64(base.Hypervisor.VCPUs))
		wantMiB := big.NewInt(int64(base.Hypervisor.MemoryMiB))
		wantParams := base.Hypervisor.KernelParams
		if v, present := ann[AnnotationVCPUs]; present {
			n, perr := strconv.Atoi(v)
			ok = ok && perr == nil && n >= minVCPUs && n <= maxVCPUs
			wantVCPUs.SetInt64(int64(n))
		}
		if v, present := ann[AnnotationMemoryMiB]; present {
			n, perr := strconv.Atoi(v)
			most := maxMemoryMiB
			if m := base.Hypervisor.MemoryMaxMiB; m > 0 {
				most = max(m, base.Hypervisor.MemoryMiB)
			}
			ok = ok && perr == nil && n >= minMemoryMiB && n <= most
			wantMiB.SetInt64(int64(n))
		}
		if v, present := ann[AnnotationKernelParams]; present {
			wantParams = append(slices.Clone(wantParams), strings.Fields(v)...)
			for _, p := range strings.Fields(v) {
				ok = ok && p != "--" && strings.Count(p, `"`)%2 == 0 && !strings.ContainsAny(p, "\x00\n")
			}
		}
		if strings.HasPrefix(extraKey, AnnotationPrefix) && extraKey != AnnotationVCPUs &&
			extraKey != AnnotationMemoryMiB && extraKey != AnnotationKernelParams {
			ok = false
		}
		num := func(k string) *big.Int {
			v, present := ann[k]
			if !present {
				return new(big.Int)
			}
			n, perr := strconv.ParseInt(v, 10, 64)
			if perr != nil || n < 0 {
				ok = false
				return new(big.Int)
			}
			return big.NewInt(n)
		}
		q, p, mem := num(CRISandboxCPUQuota), num(CRISandboxCPUPeriod), num(CRISandboxMemory)
		ceil := func(a, b *big.Int) *big.Int {
			r := new(big.Int).Add(a, b)
			r.Sub(r, big.NewInt(1))
			return r.Quo(r, b)
		}
		if q.Sign() > 0 && p.Sign() > 0 {
			wantVCPUs.Add(wantVCPUs, ceil(q, p))
		}
		if mem.Sign() > 0 {
			wantMiB.Add(wantMiB, ceil(mem, big.NewInt(1<<20)))
		}
		inRange := func(v *big.Int, lo, hi int64) bool { return v.Cmp(big.NewInt(lo)) >= 0 && v.Cmp(big.NewInt(hi)) <= 0 }
		ok = ok && inRange(wantVCPUs, minVCPUs, maxVCPUs) && inRange(wantMiB, minMemoryMiB, maxMemoryMiB)

		if !ok {
			if err == nil {
				t.Fatalf("ForPod(%q) accepted a pod of %d vCPUs %d MiB; want an error", ann, got.Hypervisor.VCPUs,
					got.Hypervisor.MemoryMiB)
			}
			if err.Error() == "" {
				t.Fatal("ForPod failed with an empty error")
			}
			return
		}
		if err != nil {
			t.Fatalf("ForPod(%q): %v; want %s vCPUs %s MiB", ann, err, wantVCPUs, wantMiB)
		}
		if int64(got.Hypervisor.VCPUs) != wantVCPUs.Int64() || int64(got.Hypervisor.MemoryMiB) != wantMiB.Int64() ||
			!slices.Equal(got.Hypervisor.KernelParams, wantParams) {
			t.Fatalf("ForPod(%q) = %d vCPUs %d MiB params %q; want %s %s %q", ann, got.Hypervisor.VCPUs,
				got.Hypervisor.MemoryMiB, got.Hypervisor.KernelParams, wantVCPUs, wantMiB, wantParams)
		}
		if err := got.Validate(); err != nil {
			t.Fatalf("ForPod(%q) gave a configuration that does not validate: %v", ann, err)
		}
	})
}
