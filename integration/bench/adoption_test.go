package main

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestAdoptions(t *testing.T) {
	cases := []struct {
		name    string
		log     string
		want    []time.Duration
		wantErr string
	}{
		{name: "none", log: "time=\"x\" level=info msg=\"starting containerd\"\n"},
		{name: "two", log: `time="x" level=info msg="the spare shim's warm VM runs the task" container=c network_rehearsed=true runtime=io.containerd.kiln.v2 sandbox=kiln-1 took=152.086503ms
time="x" level=info msg="RunPodSandbox returns"
time="x" level=info msg="the spare shim's warm VM runs the task" container=d took=1.5s
time="x" level=info msg="the spare shim's warm VM runs the task" container=e took=1m1.5s network_rehearsed=false
`, want: []time.Duration{152086503 * time.Nanosecond, 1500 * time.Millisecond, 61500 * time.Millisecond}},
		{name: "no duration", log: `time="x" level=info msg="the spare shim's warm VM runs the task" container=c` + "\n", wantErr: "without its duration"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "containerd.log")
			if err := os.WriteFile(path, []byte(tc.log), 0o600); err != nil {
				t.Fatal(err)
			}
			got, err := adoptions(path)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("adoptions = %v, %v; want error %q", got, err, tc.wantErr)
				}
				return
			}
			if err != nil || !slices.Equal(got, tc.want) {
				t.Fatalf("adoptions = %v, %v; want %v", got, err, tc.want)
			}
		})
	}
}
