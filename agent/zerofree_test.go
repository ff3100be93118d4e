package agent

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
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

// The child's count is the answer; a child that fails, or that the OOM killer ends, is an error naming what it
// said. The reaper, which reaps every child of a guest's init, is held meanwhile: the child's exit is the caller's.
func TestRunZeroFree(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	reaper := StartReaper(ctx, quietLog())
	for _, tc := range []struct {
		name   string
		script string
		want   int64
		errHas string
	}{
		{"zeroed", "echo 4194304", 4 << 20, ""},
		{"killed", "echo out of memory >&2; kill -9 $$", 0, "signal: killed: out of memory"},
		{"failed", "echo no MemFree >&2; exit 1", 0, "exit status 1: no MemFree"},
		{"no count", "echo some", 0, `its count "some\n"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n, err := runZeroFree(reaper, exec.Command("/bin/sh", "-c", tc.script))
			if n != tc.want || (tc.errHas == "") != (err == nil) || err != nil && !strings.Contains(err.Error(), tc.errHas) {
				t.Fatalf("runZeroFree = %d, %v; want %d and an error saying %q", n, err, tc.want, tc.errHas)
			}
		})
	}
	t.Run("reaper held", func(t *testing.T) {
		holds := func() int {
			reaper.mu.Lock()
			defer reaper.mu.Unlock()
			return reaper.holds
		}
		done := make(chan error, 1)
		go func() {
			_, err := runZeroFree(reaper, exec.Command("/bin/sh", "-c", "sleep 0.5; echo 1"))
			done <- err
		}()
		for deadline := time.Now().Add(400 * time.Millisecond); holds() == 0; time.Sleep(time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatal("the reaper was not held while the child ran")
			}
		}
		if err := <-done; err != nil {
			t.Fatal(err)
		}
		if n := holds(); n != 0 {
			t.Errorf("the reaper is held %d times after the child's end, want 0", n)
		}
	})
}
