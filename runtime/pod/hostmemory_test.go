package pod

import (
	"testing"

	"github.com/kiln-runtime/kiln/runtime/share"
)

// Each tmpfs counts once, and stays counted when it is no longer exported: a later one of the same size adds
// its own.
func TestVolumeAllowance(t *testing.T) {
	a, b := share.Device{Major: 0, Minor: 40}, share.Device{Major: 0, Minor: 41}
	for _, c := range []struct {
		name    string
		total   int64
		counted map[share.Device]bool
		sizes   map[share.Device]int64
		want    int64
		grew    bool
	}{
		{"none", 0, nil, nil, 0, false},
		{"a first one", 0, nil, map[share.Device]int64{a: 8 << 20}, 8 << 20, true},
		{"the same again", 8 << 20, map[share.Device]bool{a: true}, map[share.Device]int64{a: 8 << 20}, 8 << 20, false},
		{"another after the first went", 8 << 20, map[share.Device]bool{a: true}, map[share.Device]int64{b: 8 << 20}, 16 << 20, true},
		{"both", 8 << 20, map[share.Device]bool{a: true}, map[share.Device]int64{a: 8 << 20, b: 1 << 20}, 9 << 20, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			if got, grew := volumeAllowance(c.total, c.counted, c.sizes); got != c.want || grew != c.grew {
				t.Errorf("volumeAllowance = %d, %v; want %d, %v", got, grew, c.want, c.grew)
			}
		})
	}
}
