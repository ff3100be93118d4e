package qemu

import "testing"

// The guest RAM Kiln's vsock device reaches is what the guest was given: the boot memory of a VM that may grow,
// and what GrowGuestMemory added; all of it for a VM that may not grow.
func TestGrowGuestMemoryRaisesTheGrant(t *testing.T) {
	for _, tc := range []struct {
		name      string
		boot, max int
		grow      []int
		want      uint64 // MiB granted at the end; 0: no grant (all RAM)
	}{
		{name: "fixed size", boot: 256, max: 256},
		{name: "booted", boot: 256, max: 1024, want: 256},
		{name: "grown", boot: 256, max: 1024, grow: []int{512}, want: 512},
		{name: "grown twice", boot: 256, max: 1024, grow: []int{512, 1024}, want: 1024},
		{name: "never shrinks", boot: 256, max: 1024, grow: []int{768, 384}, want: 768},
		{name: "past the RAM, refused", boot: 256, max: 1024, grow: []int{2048}, want: 256},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg, _ := startableConfig(t)
			mc := quietConfig(t, cfg)
			mc.TSCkHz = 1
			mc.MemoryMiB, mc.MaxMemoryMiB = tc.boot, tc.max
			m, err := New(mc)
			if err != nil {
				t.Fatal(err)
			}
			for _, mib := range tc.grow {
				err := m.GrowGuestMemory(mib)
				if refused := mib > tc.max; refused != (err != nil) {
					t.Errorf("GrowGuestMemory(%d) = %v", mib, err)
				}
			}
			if tc.want == 0 {
				if m.grant != nil {
					t.Fatalf("a VM of fixed size has a grant of %d bytes", m.grant.Bytes())
				}
				return
			}
			if m.grant == nil {
				t.Fatal("a VM that may grow has no grant")
			}
			if got := m.grant.Bytes(); got != tc.want<<20 {
				t.Errorf("granted %d MiB, want %d", got>>20, tc.want)
			}
		})
	}
}
