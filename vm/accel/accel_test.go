package accel

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestDetect(t *testing.T) {
	tests := []struct {
		name     string
		modules  []string
		device   bool
		want     string
		kind     Kind
		fallback bool
		errPart  string
		reason   string
	}{
		{name: "intel auto", modules: []string{"kvm", "kvm_intel"}, device: true, want: "auto", kind: KVM},
		{name: "amd auto", modules: []string{"kvm", "kvm_amd"}, device: true, want: "auto", kind: KVM},
		{name: "pvm auto falls back", modules: []string{"kvm", "kvm_pvm"}, device: true, want: "auto", kind: TCG, fallback: true, reason: "kvm_pvm"},
		{name: "no device", modules: []string{"kvm_intel"}, device: false, want: "auto", kind: TCG, fallback: true, reason: "does not exist"},
		{name: "forced tcg", modules: []string{"kvm_intel"}, device: true, want: "tcg", kind: TCG},
		{name: "forced kvm unusable", modules: []string{"kvm_pvm"}, device: true, want: "kvm", errPart: "not usable"},
		{name: "forced kvm", modules: []string{"kvm_amd"}, device: true, want: "kvm", kind: KVM},
		{name: "bad value", want: "xen", errPart: "unknown accelerator"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			h := Host{SysModule: filepath.Join(dir, "module"), KVMDevice: filepath.Join(dir, "kvm")}
			for _, m := range tt.modules {
				if err := os.MkdirAll(filepath.Join(h.SysModule, m), 0o755); err != nil {
					t.Fatal(err)
				}
			}
			if tt.device {
				if err := os.WriteFile(h.KVMDevice, nil, 0o600); err != nil {
					t.Fatal(err)
				}
			}
			c, err := h.Detect(tt.want)
			if tt.errPart != "" {
				if err == nil || !strings.Contains(err.Error(), tt.errPart) {
					t.Fatalf("want error containing %q, got %v", tt.errPart, err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if c.Kind != tt.kind || c.Fallback != tt.fallback {
				t.Fatalf("got %+v, want kind %s fallback %v", c, tt.kind, tt.fallback)
			}
			if !strings.Contains(c.Reason, tt.reason) {
				t.Fatalf("reason %q does not mention %q", c.Reason, tt.reason)
			}
		})
	}
}
