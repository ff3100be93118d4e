// Package accel decides which CPU accelerator a microVM uses: hardware KVM where the host has a real
// kvm_intel/kvm_amd module and /dev/kvm opens, else QEMU's TCG software CPU. It knows nothing of QEMU beyond the
// accelerator's name.
package accel

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
)

// Kind is an accelerator.
type Kind string

// Accelerators.
const (
	KVM Kind = "kvm"
	TCG Kind = "tcg"
)

// Choice is the decision and why it was made.
type Choice struct {
	Kind   Kind
	Reason string
	// Fallback is true when hardware acceleration was wanted (auto) but is not usable: worth a warning.
	Fallback bool
}

// Host abstracts the host facts the decision reads, so tests can vary them.
type Host struct {
	// SysModule is the directory listing loaded kernel modules (normally /sys/module).
	SysModule string
	// KVMDevice is the KVM device node (normally /dev/kvm).
	KVMDevice string
}

// DefaultHost reads the real host.
func DefaultHost() Host { return Host{SysModule: "/sys/module", KVMDevice: "/dev/kvm"} }

// Detect decides for the wanted accelerator ("auto", "kvm" or "tcg").
func (h Host) Detect(want string) (Choice, error) {
	switch want {
	case "tcg":
		return Choice{Kind: TCG, Reason: "forced by configuration (hypervisor.accelerator = \"tcg\")"}, nil
	case "kvm":
		if reason, ok := h.kvmUsable(); !ok {
			return Choice{}, fmt.Errorf("hypervisor.accelerator = \"kvm\" but KVM is not usable: %s; set accelerator to \"auto\" or \"tcg\"", reason)
		}
		return Choice{Kind: KVM, Reason: "forced by configuration (hypervisor.accelerator = \"kvm\")"}, nil
	case "", "auto":
		if reason, ok := h.kvmUsable(); !ok {
			return Choice{Kind: TCG, Reason: reason + "; using TCG (software CPU, much slower)", Fallback: true}, nil
		}
		return Choice{Kind: KVM, Reason: h.kvmModule() + " loaded and " + h.KVMDevice + " opens"}, nil
	default:
		return Choice{}, fmt.Errorf("unknown accelerator %q: want auto, kvm or tcg", want)
	}
}

func (h Host) kvmModule() string {
	for _, m := range []string{"kvm_intel", "kvm_amd"} {
		if _, err := os.Stat(filepath.Join(h.SysModule, m)); err == nil {
			return m
		}
	}
	return ""
}

func (h Host) kvmUsable() (string, bool) {
	if h.kvmModule() == "" {
		others := []string{}
		for _, m := range []string{"kvm_pvm", "kvm"} {
			if _, err := os.Stat(filepath.Join(h.SysModule, m)); err == nil {
				others = append(others, m)
			}
		}
		if len(others) > 0 {
			return fmt.Sprintf("no kvm_intel or kvm_amd module (loaded: %v; a nested PVM hypervisor cannot run ordinary guest kernels)", others), false
		}
		return "no kvm_intel or kvm_amd module loaded", false
	}
	f, err := os.OpenFile(h.KVMDevice, os.O_RDWR, 0)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return h.KVMDevice + " does not exist", false
		}
		return fmt.Sprintf("cannot open %s: %v", h.KVMDevice, err), false
	}
	f.Close()
	return "", true
}
