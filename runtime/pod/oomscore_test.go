package pod

import (
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/kiln-runtime/kiln/runtime/bundle"
	"github.com/kiln-runtime/kiln/runtime/hostcgroup"
)

func TestHighestOOMScoreAdj(t *testing.T) {
	withAdj := func(v int) *bundle.Bundle {
		return &bundle.Bundle{Spec: &specs.Spec{Process: &specs.Process{OOMScoreAdj: &v}}}
	}
	cases := []struct {
		name    string
		bundles map[string]*bundle.Bundle
		want    int
		wantOK  bool
	}{
		{name: "no containers"},
		{name: "none named", bundles: map[string]*bundle.Bundle{"a": {Spec: &specs.Spec{Process: &specs.Process{}}}, "b": {Spec: &specs.Spec{}}}},
		{name: "sandbox alone", bundles: map[string]*bundle.Bundle{"pause": withAdj(-998)}, want: -998, wantOK: true},
		{name: "best effort beside the sandbox", bundles: map[string]*bundle.Bundle{"pause": withAdj(-998), "a": withAdj(1000), "b": withAdj(-997)}, want: 1000, wantOK: true},
		{name: "one named", bundles: map[string]*bundle.Bundle{"a": {Spec: &specs.Spec{Process: &specs.Process{}}}, "b": withAdj(-5)}, want: -5, wantOK: true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if got, ok := highestOOMScoreAdj(tc.bundles); got != tc.want || ok != tc.wantOK {
				t.Errorf("highestOOMScoreAdj = %d, %v; want %d, %v", got, ok, tc.want, tc.wantOK)
			}
		})
	}
}

// The score reaches a VM process and the processes below it (virtiofsd's sandbox works in a child), and goes
// down again as well as up (here not below this process's own, which would take CAP_SYS_RESOURCE, which a shim
// has and this machine's root has not).
func TestSetOOMScoreAdj(t *testing.T) {
	b, err := os.ReadFile("/proc/self/oom_score_adj")
	if err != nil {
		t.Fatal(err)
	}
	own, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || own > 700 {
		t.Fatalf("this process's oom_score_adj %q: the test needs one of 700 or less", b)
	}
	cmd := exec.Command("/bin/sh", "-c", "sleep 60 & wait")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		for _, pid := range hostcgroup.Descendants(cmd.Process.Pid) {
			if p, err := os.FindProcess(pid); err == nil {
				_ = p.Kill()
			}
		}
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	var tree []int
	for deadline := time.Now().Add(10 * time.Second); len(tree) < 2; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the shell's child did not start")
		}
		tree = append([]int{cmd.Process.Pid}, hostcgroup.Descendants(cmd.Process.Pid)...)
	}
	for _, adj := range []int{own + 300, own + 100} {
		if err := setOOMScoreAdj([]int{cmd.Process.Pid, 1 << 30}, adj); err != nil {
			t.Fatalf("set %d: %v", adj, err)
		}
		for _, pid := range tree {
			b, err := os.ReadFile(fmt.Sprintf("/proc/%d/oom_score_adj", pid))
			if err != nil {
				t.Fatal(err)
			}
			if got := strings.TrimSpace(string(b)); got != fmt.Sprint(adj) {
				t.Errorf("oom_score_adj of process %d: %s, want %d", pid, got, adj)
			}
		}
	}
}
