package main

import (
	"maps"
	"testing"
	"time"
)

func TestByName(t *testing.T) {
	ms := time.Millisecond
	for _, tc := range []struct {
		name          string
		before, after procTimes
		want          map[string]time.Duration
	}{
		{
			name:   "a process alive at both counts its difference",
			before: procTimes{1: {comm: "qemu", cpu: 100 * ms}},
			after:  procTimes{1: {comm: "qemu", cpu: 350 * ms}},
			want:   map[string]time.Duration{"qemu": 250 * ms},
		},
		{
			name:  "one started since counts whole, summed by name",
			after: procTimes{2: {comm: "qemu", cpu: 40 * ms}, 3: {comm: "qemu", cpu: 60 * ms}},
			want:  map[string]time.Duration{"qemu": 100 * ms},
		},
		{
			name:   "children that exited count under their parent",
			before: procTimes{4: {comm: "containerd", cpu: 10 * ms, children: 500 * ms}},
			after:  procTimes{4: {comm: "containerd", cpu: 30 * ms, children: 820 * ms}},
			want:   map[string]time.Duration{"containerd": 20 * ms, "containerd's children": 320 * ms},
		},
		{
			name:   "init's children are orphans of earlier work",
			before: procTimes{1: {comm: "systemd", cpu: 10 * ms, children: 100 * ms}},
			after:  procTimes{1: {comm: "systemd", cpu: 12 * ms, children: 3100 * ms}},
			want:   map[string]time.Duration{"systemd": 2 * ms},
		},
		{
			name:   "a pid reused by another process counts whole",
			before: procTimes{5: {comm: "crictl", start: "100", cpu: 90 * ms, children: 10 * ms}},
			after:  procTimes{5: {comm: "sleep", start: "180", cpu: 5 * ms}},
			want:   map[string]time.Duration{"sleep": 5 * ms},
		},
		{
			name:   "a pid reused by a process of the same name counts whole",
			before: procTimes{7: {comm: "crictl", start: "100", cpu: 90 * ms}},
			after:  procTimes{7: {comm: "crictl", start: "240", cpu: 60 * ms}},
			want:   map[string]time.Duration{"crictl": 60 * ms},
		},
		{
			name:   "a process that used nothing is left out",
			before: procTimes{6: {comm: "pause", cpu: 7 * ms}},
			after:  procTimes{6: {comm: "pause", cpu: 7 * ms}},
			want:   map[string]time.Duration{},
		},
	} {
		if got := byName(tc.before, tc.after); !maps.Equal(got, tc.want) {
			t.Errorf("%s: byName = %v, want %v", tc.name, got, tc.want)
		}
	}
}
