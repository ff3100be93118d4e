package agent

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

func TestParseCPUList(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want []int
		ok   bool
	}{
		{"", nil, true},
		{"0", []int{0}, true},
		{"0-3", []int{0, 1, 2, 3}, true},
		{"0-1,3,5-6", []int{0, 1, 3, 5, 6}, true},
		{"3-1", nil, false},
		{"1,0", nil, false},
		{"0-1,1", nil, false},
		{"0-8192", nil, false},
		{"-1", nil, false},
		{"x", nil, false},
	} {
		got, err := parseCPUList(tc.in)
		if (err == nil) != tc.ok || !slices.Equal(got, tc.want) {
			t.Errorf("parseCPUList(%q) = %v, %v; want %v, ok %v", tc.in, got, err, tc.want, tc.ok)
		}
	}
}

func TestGuestCPUsAdd(t *testing.T) {
	layout := func(t *testing.T, present, online string) string {
		sys := t.TempDir()
		dir := filepath.Join(sys, "devices/system/cpu")
		for i := 0; i < 4; i++ {
			if err := os.MkdirAll(filepath.Join(dir, fmt.Sprintf("cpu%d", i)), 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("cpu%d", i), "online"), []byte("0"), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		for name, v := range map[string]string{"present": present, "online": online} {
			if err := os.WriteFile(filepath.Join(dir, name), []byte(v+"\n"), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		return sys
	}
	onlined := func(sys string) []int {
		var cpus []int
		for i := 0; i < 4; i++ {
			if b, err := os.ReadFile(filepath.Join(sys, "devices/system/cpu", fmt.Sprintf("cpu%d", i), "online")); err == nil && string(b) == "1" {
				cpus = append(cpus, i)
			}
		}
		return cpus
	}
	t.Run("lowest first", func(t *testing.T) {
		sys := layout(t, "0-3", "0,2")
		have, err := (&GuestCPUs{Sys: sys}).Add(3)
		if err != nil || have != 3 || !slices.Equal(onlined(sys), []int{1}) {
			t.Fatalf("Add(3) = %d, %v, brought %v online; want 3, nil, [1]", have, err, onlined(sys))
		}
	})
	t.Run("enough already", func(t *testing.T) {
		sys := layout(t, "0-3", "0-1")
		if have, err := (&GuestCPUs{Sys: sys}).Add(2); err != nil || have != 2 || onlined(sys) != nil {
			t.Fatalf("Add(2) = %d, %v, brought %v online", have, err, onlined(sys))
		}
	})
	t.Run("no more vCPUs", func(t *testing.T) {
		sys := layout(t, "0-3", "0-1")
		have, err := (&GuestCPUs{Sys: sys}).Add(6)
		if !errors.Is(err, ErrNoCPU) || have != 4 {
			t.Fatalf("Add(6) = %d, %v; want 4 and ErrNoCPU", have, err)
		}
	})
	t.Run("no CPU hot-plug", func(t *testing.T) {
		sys := layout(t, "0-3", "0")
		if err := os.Remove(filepath.Join(sys, "devices/system/cpu/cpu1/online")); err != nil {
			t.Fatal(err)
		}
		if _, err := (&GuestCPUs{Sys: sys}).Add(2); !errors.Is(err, ErrNoHotplug) {
			t.Fatalf("Add(2) without cpu1/online: %v, want ErrNoHotplug", err)
		}
	})
	t.Run("a list the kernel would not write", func(t *testing.T) {
		sys := layout(t, "0-3,2", "0")
		if _, err := (&GuestCPUs{Sys: sys}).Add(2); err == nil || !strings.Contains(err.Error(), "cpu/present: CPU list") {
			t.Fatalf("Add with present %q: %v, want an error naming the present CPUs' file", "0-3,2", err)
		}
	})
}
