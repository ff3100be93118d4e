package config

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// The annotations containerd's CRI plugin puts on a pod's sandbox container, from the pod's resources (the sum
// of its containers' limits).
const (
	CRISandboxCPUPeriod = "io.kubernetes.cri.sandbox-cpu-period"
	CRISandboxCPUQuota  = "io.kubernetes.cri.sandbox-cpu-quota"
	CRISandboxCPUShares = "io.kubernetes.cri.sandbox-cpu-shares"
	CRISandboxMemory    = "io.kubernetes.cri.sandbox-memory"
)

// The io.kiln.* pod annotations, each honoured only when runtime.enable_annotations allows it.
const (
	// AnnotationVCPUs sets hypervisor.vcpus for the pod (before its resources are added).
	AnnotationVCPUs = AnnotationPrefix + "vcpus"
	// AnnotationMemoryMiB sets hypervisor.memory_mib for the pod (before its resources are added).
	AnnotationMemoryMiB = AnnotationPrefix + "memory_mib"
	// AnnotationKernelParams adds guest kernel parameters, separated by spaces.
	AnnotationKernelParams = AnnotationPrefix + "kernel_params"
)

// ForPod is the configuration of one pod: the io.kiln.* annotations the configuration allows applied, then the
// VM grown by the pod's resources as CRI gives them: vCPUs + ceil(quota/period), memory + the memory limit. An
// io.kiln.* annotation the configuration does not allow, or does not know, is an error naming it.
func (c Config) ForPod(annotations map[string]string) (Config, error) {
	var errs []error
	for k, v := range annotations {
		if !strings.HasPrefix(k, AnnotationPrefix) {
			continue
		}
		if !c.annotationAllowed(k) {
			errs = append(errs, fmt.Errorf("pod annotation %s is not allowed: add it to runtime.enable_annotations in %s", k, c.sourceName()))
			continue
		}
		switch k {
		case AnnotationVCPUs:
			n, err := strconv.Atoi(v)
			if err != nil || n < minVCPUs || n > maxVCPUs {
				errs = append(errs, fmt.Errorf("pod annotation %s = %q: want a number of vCPUs from %d to %d", k, v, minVCPUs, maxVCPUs))
			}
			c.Hypervisor.VCPUs = n
		case AnnotationMemoryMiB:
			n, err := strconv.Atoi(v)
			most := maxMemoryMiB
			if m := c.Hypervisor.MemoryMaxMiB; m > 0 {
				// The operator's ceiling on what a VM may grow to bounds what a pod may ask for at its boot too.
				most = max(m, c.Hypervisor.MemoryMiB)
			}
			if err != nil || n < minMemoryMiB || n > most {
				errs = append(errs, fmt.Errorf("pod annotation %s = %q: want MiB from %d to %d (hypervisor.memory_max_mib)", k, v, minMemoryMiB, most))
			}
			c.Hypervisor.MemoryMiB = n
		case AnnotationKernelParams:
			params := strings.Fields(v)
			if err := checkKernelParams("pod annotation "+k, params); err != nil {
				errs = append(errs, err)
			}
			c.Hypervisor.KernelParams = append(append([]string(nil), c.Hypervisor.KernelParams...), params...)
		default:
			errs = append(errs, fmt.Errorf("pod annotation %s: Kiln knows %s, %s and %s", k, AnnotationVCPUs, AnnotationMemoryMiB, AnnotationKernelParams))
		}
	}
	quota, qerr := annotationInt(annotations, CRISandboxCPUQuota)
	period, perr := annotationInt(annotations, CRISandboxCPUPeriod)
	mem, merr := annotationInt(annotations, CRISandboxMemory)
	errs = append(errs, qerr, perr, merr)
	if err := errors.Join(errs...); err != nil {
		return Config{}, err
	}
	// Rounded up without overflowing, and summed only within bounds: CRI's values come from the pod spec and may
	// be anything up to 2^63-1; the error gives the parts, as a sum of huge numbers means nothing to the reader.
	var extraVCPUs, extraMiB int64
	if quota > 0 && period > 0 {
		extraVCPUs = ceilDiv(quota, period)
	}
	if mem > 0 {
		extraMiB = ceilDiv(mem, 1<<20)
	}
	if vcpus := int64(c.Hypervisor.VCPUs); extraVCPUs > maxVCPUs || vcpus+extraVCPUs < minVCPUs || vcpus+extraVCPUs > maxVCPUs {
		return Config{}, fmt.Errorf("pod needs %d + %d vCPUs (hypervisor.vcpus or %s, plus its CPU limit: quota %d / period %d, rounded up): a VM has %d to %d",
			vcpus, extraVCPUs, AnnotationVCPUs, quota, period, minVCPUs, maxVCPUs)
	}
	if mib := int64(c.Hypervisor.MemoryMiB); extraMiB > maxMemoryMiB || mib+extraMiB < minMemoryMiB || mib+extraMiB > maxMemoryMiB {
		return Config{}, fmt.Errorf("pod needs %d + %d MiB of memory (hypervisor.memory_mib or %s, plus its memory limit of %d bytes): a VM has %d to %d MiB",
			mib, extraMiB, AnnotationMemoryMiB, mem, minMemoryMiB, maxMemoryMiB)
	}
	c.Hypervisor.BootVCPUs, c.Hypervisor.BootMemoryMiB = c.Hypervisor.VCPUs, c.Hypervisor.MemoryMiB
	c.Hypervisor.VCPUs += int(extraVCPUs)
	c.Hypervisor.MemoryMiB += int(extraMiB)
	return c, nil
}

// ceilDiv is a/b rounded up, for a >= 0 and b > 0, without the overflow of (a+b-1)/b.
func ceilDiv(a, b int64) int64 {
	q := a / b
	if a%b != 0 {
		q++
	}
	return q
}

func (c Config) annotationAllowed(key string) bool {
	for _, a := range c.Runtime.EnableAnnotations {
		if prefix, ok := strings.CutSuffix(a, "*"); ok && strings.HasPrefix(key, prefix) || a == key {
			return true
		}
	}
	return false
}

func (c Config) sourceName() string {
	if c.Source == "" {
		return "Kiln's configuration (built-in defaults now; see `kiln config show`)"
	}
	return c.Source
}

// annotationInt reads a non-negative integer annotation; absent is 0.
func annotationInt(annotations map[string]string, key string) (int64, error) {
	v, ok := annotations[key]
	if !ok || v == "" {
		return 0, nil
	}
	n, err := strconv.ParseInt(v, 10, 64)
	if err != nil || n < 0 {
		return 0, fmt.Errorf("pod annotation %s = %q: want a non-negative integer", key, v)
	}
	return n, nil
}
