package rlimit

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

const helperEnv = "KILN_RLIMIT_HELPER"

// A process whose soft limit on open files is below its hard one (as systemd starts containerd: 1024 of 524288)
// has its children inherit that soft limit, not the one Go raised it to: the test runs itself again with a lower
// soft limit, and the child reports what it would pass on.
func TestInheritedOpenFiles(t *testing.T) {
	if os.Getenv(helperEnv) != "" {
		t.Skip("the helper's run: see TestInheritedHelper")
	}
	var now unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &now); err != nil {
		t.Fatal(err)
	}
	if now.Max < 512 {
		t.Fatalf("hard limit on open files %d: the test needs one of 512 or more", now.Max)
	}
	cmd := exec.Command("/bin/sh", "-c", `ulimit -S -n 300 && exec "$0" -test.run='^TestInheritedHelper$' -test.v`, os.Args[0])
	cmd.Env = append(os.Environ(), helperEnv+"=1")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("the helper: %v\n%s", err, out)
	}
	if want := fmt.Sprintf("inherited RLIMIT_NOFILE 300:%d, own %d:%d", now.Max, now.Max-1, now.Max); !strings.Contains(string(out), want) {
		t.Errorf("the helper said:\n%s\nwant %q", out, want)
	}
}

// TestInheritedHelper reports the limit on open files the process passes on, and its own.
func TestInheritedHelper(t *testing.T) {
	if os.Getenv(helperEnv) == "" {
		t.Skip("run by TestInheritedOpenFiles")
	}
	var own unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &own); err != nil {
		t.Fatal(err)
	}
	limits, err := Inherited(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(limits) != len(kinds) {
		t.Errorf("%d limits inherited, want %d", len(limits), len(kinds))
	}
	for _, l := range limits {
		if l.Type == "RLIMIT_NOFILE" {
			fmt.Printf("inherited RLIMIT_NOFILE %d:%d, own %d:%d\n", l.Soft, l.Hard, own.Cur, own.Max)
			return
		}
	}
	t.Fatal("no RLIMIT_NOFILE among the inherited limits")
}

func TestFill(t *testing.T) {
	inherited := []specs.POSIXRlimit{{Type: "RLIMIT_NOFILE", Soft: 1024, Hard: 524288}, {Type: "RLIMIT_NPROC", Soft: 7, Hard: 8}}
	cases := []struct {
		name string
		have []specs.POSIXRlimit
		want []specs.POSIXRlimit
	}{
		{name: "none named", want: inherited},
		{name: "one named", have: []specs.POSIXRlimit{{Type: "RLIMIT_NOFILE", Soft: 1, Hard: 2}},
			want: []specs.POSIXRlimit{{Type: "RLIMIT_NOFILE", Soft: 1, Hard: 2}, {Type: "RLIMIT_NPROC", Soft: 7, Hard: 8}}},
		{name: "all named", have: []specs.POSIXRlimit{{Type: "RLIMIT_NPROC", Soft: 1, Hard: 1}, {Type: "RLIMIT_NOFILE", Soft: 3, Hard: 3}},
			want: []specs.POSIXRlimit{{Type: "RLIMIT_NPROC", Soft: 1, Hard: 1}, {Type: "RLIMIT_NOFILE", Soft: 3, Hard: 3}}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p := &specs.Process{Args: []string{"sh"}, Rlimits: slices.Clone(tc.have)}
			got := Fill(p, inherited)
			if !slices.Equal(got.Rlimits, tc.want) || !slices.Equal(got.Args, p.Args) {
				t.Errorf("Fill = %+v, want the process with %v", got, tc.want)
			}
			if !slices.Equal(p.Rlimits, tc.have) {
				t.Errorf("Fill changed the process it was given: %v, was %v", p.Rlimits, tc.have)
			}
		})
	}
	if Fill(nil, inherited) != nil {
		t.Error("Fill of no process made one")
	}
}

func TestNumber(t *testing.T) {
	for name, want := range map[string]int{"RLIMIT_NOFILE": unix.RLIMIT_NOFILE, "RLIMIT_NPROC": unix.RLIMIT_NPROC, "RLIMIT_RTTIME": unix.RLIMIT_RTTIME} {
		if got, ok := Number(name); !ok || got != want {
			t.Errorf("Number(%s) = %d, %v; want %d", name, got, ok, want)
		}
	}
	if _, ok := Number("RLIMIT_UNKNOWN"); ok {
		t.Error("Number of an unknown limit succeeded")
	}
}
