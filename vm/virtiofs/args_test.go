package virtiofs

import (
	"slices"
	"strings"
	"testing"
)

func TestArgs(t *testing.T) {
	base := Config{SourceDir: "/run/kiln/vm1/share/shared", Cache: CacheAuto, LogLevel: "warn"}
	tests := []struct {
		name    string
		mutate  func(*Config)
		want    []string
		notWant []string
	}{
		{
			name: "defaults",
			want: []string{"--fd=3", "source=/run/kiln/vm1/share/shared", "sandbox=namespace",
				"announce_submounts", "modcaps=-mknod", "no_xattr", "log_level=warn"},
			notWant: []string{"xattr", "--socket-path"},
		},
		{
			// Kiln's auto keeps the guest's cache across opens, with auto's one-second revalidation.
			name:    "cache auto",
			want:    []string{"cache=always", "timeout=1"},
			notWant: []string{"cache=auto"},
		},
		{
			name:    "cache always",
			mutate:  func(c *Config) { c.Cache = CacheAlways },
			want:    []string{"cache=always"},
			notWant: []string{"timeout=1"},
		},
		{
			name:    "xattr and cache none",
			mutate:  func(c *Config) { c.Xattr = true; c.Cache = CacheNone },
			want:    []string{"xattrmap=:ok:all:security.capability::" + ":ok:all:user.::" + ":bad:all:::", "killpriv_v2", "cache=none"},
			notWant: []string{"no_xattr", "xattr", "cache=always", "timeout=1"},
		},
		{
			name:   "thread pool and extra args last",
			mutate: func(c *Config) { c.ThreadPoolSize = 4; c.ExtraArgs = []string{"-o", "writeback"} },
			want:   []string{"--thread-pool-size=4", "writeback"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := base
			if tt.mutate != nil {
				tt.mutate(&c)
			}
			got := args(c)
			for _, w := range tt.want {
				if !slices.Contains(got, w) {
					t.Errorf("args %q lack %q", got, w)
				}
			}
			for _, nw := range tt.notWant {
				if slices.Contains(got, nw) {
					t.Errorf("args %q contain %q", got, nw)
				}
			}
			for i, a := range got {
				if a == "-o" && (i+1 == len(got) || strings.HasPrefix(got[i+1], "-")) {
					t.Errorf("args %q: -o without a value at %d", got, i)
				}
			}
			if len(c.ExtraArgs) > 0 && !slices.Equal(got[len(got)-len(c.ExtraArgs):], c.ExtraArgs) {
				t.Errorf("extra args not last: %q", got)
			}
		})
	}
}
