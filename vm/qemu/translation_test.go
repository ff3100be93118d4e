package qemu

import (
	"strings"
	"testing"
)

// QEMU 7.2's "info jit" of a clone after a container's start.
const jitSample = `Translation buffer state:
gen code size       44305619/134135808
TB count            78564
TB avg target size  18 max=1760 bytes
TB avg host size    322 bytes (expansion ratio: 17.1)
cross page TB count 240 (0%)
direct jump count   49011 (62%) (2 jumps=40398 51%)
TB hash buckets     29894/32768 (91.23% head buckets used)
TB hash occupancy   53.45% avg chain occ. Histogram: [0,10)%|▃ ▆  █▂▇▁▄|[90,100]%
TB hash avg chain   1.103 buckets. Histogram: 1|█▁▁|3

Statistics:
TB flush count      2
TB invalidate count 7
TLB full flushes    0
TLB partial flushes 627
TLB elided flushes  6261
[TCG profiler not compiled]
`

func TestParseJIT(t *testing.T) {
	tests := []struct {
		name    string
		text    string
		want    Translation
		wantErr string
	}{
		{name: "qemu 7.2", text: jitSample, want: Translation{Blocks: 78564, CodeBytes: 44305619, Flushes: 2, Invalidated: 7}},
		{name: "a figure missing", text: strings.Replace(jitSample, "TB invalidate count 7\n", "", 1), wantErr: "3 of the 4"},
		{name: "a figure garbled", text: strings.Replace(jitSample, "78564", "7856x", 1), wantErr: "TB count"},
		{name: "not info jit", text: "unknown command: 'info jit'", wantErr: "0 of the 4"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseJIT(tt.text)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("parseJIT: %+v, %v; want an error with %q", got, err, tt.wantErr)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("parseJIT: %+v, %v; want %+v", got, err, tt.want)
			}
		})
	}
}
