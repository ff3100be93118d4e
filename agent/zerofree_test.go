package agent

import (
	"os"
	"path/filepath"
	"testing"
)

func TestZeroFreeMemory(t *testing.T) {
	for _, tc := range []struct {
		name    string
		meminfo string
		zeroed  int64
		ok      bool
	}{
		// A count that does not fall (a file, not the kernel) still bounds it: what was free less the reserve.
		{"bounded by the first count", "MemTotal: 262144 kB\nMemFree: 40960 kB\n", 24 << 20, true},
		{"less than the reserve", "MemFree: 8192 kB\n", 0, true},
		{"no MemFree", "MemTotal: 262144 kB\n", 0, false},
		{"a bad count", "MemFree: -5 kB\n", 0, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "meminfo")
			if err := os.WriteFile(path, []byte(tc.meminfo), 0o644); err != nil {
				t.Fatal(err)
			}
			n, err := zeroFreeMemory(path)
			if n != tc.zeroed || (err == nil) != tc.ok {
				t.Errorf("zeroFreeMemory = %d, %v; want %d, ok %v", n, err, tc.zeroed, tc.ok)
			}
		})
	}
}
