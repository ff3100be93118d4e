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
		counted map[share.Device]int64
		sizes   map[share.Device]int64
		want    int64
		grew    bool
	}{
		{"none", nil, nil, 0, false},
		{"a first one", nil, map[share.Device]int64{a: 8 << 20}, 8 << 20, true},
		{"the same again", map[share.Device]int64{a: 8 << 20}, map[share.Device]int64{a: 8 << 20}, 8 << 20, false},
		{"another after the first went", map[share.Device]int64{a: 8 << 20}, map[share.Device]int64{b: 8 << 20}, 16 << 20, true},
		{"both", map[share.Device]int64{a: 8 << 20}, map[share.Device]int64{a: 8 << 20, b: 1 << 20}, 9 << 20, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			if got, grew := volumeAllowance(c.counted, c.sizes); got != c.want || grew != c.grew {
				t.Errorf("volumeAllowance = %d, %v; want %d, %v", got, grew, c.want, c.grew)
			}
		})
	}
}
