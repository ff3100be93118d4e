package integration

import (
	"fmt"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/kiln-runtime/kiln/runtime/stdio"
)

// TestTheAgentOutlivesAForkBomb runs a container with no pids limit that forks until the guest refuses (about
// 2000 threads in 256 MiB), then, with the guest at that ceiling, makes the agent work (listing processes, stats,
// execs that cannot fork), kills the container's processes and runs another container: the guest keeps threads
// back for its agent and kernel, so the pod lives on, as a runc host outlives a container's fork bomb.
func TestTheAgentOutlivesAForkBomb(t *testing.T) {
	v := newContainerVM(t, 256)
	c := v.create(t, "bomb", v.spec("sleep", "100000"), "", stdio.IO{})
	ctx := testCtx(t, 5*time.Minute)
	if err := c.Start(ctx); err != nil {
		t.Fatal(err)
	}
	// The shell forks until a fork is refused, which ends it; the sleeps it forked stay in the container.
	var bombErr strings.Builder
	bomb, err := c.Exec(ctx, "bomb", &specs.Process{Args: []string{"sh", "-c", "while :; do sleep 1000 & done"},
		Env: []string{"PATH=/bin"}, Cwd: "/"}, stdio.IO{Stderr: &bombErr})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := bomb.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	t.Logf("the forking shell ended: %q", bombErr.String())

	var wg sync.WaitGroup
	for i := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range 3 {
				_, _ = c.Pids(ctx)
				_, _ = c.Stats(ctx)
				if p, err := c.Exec(ctx, fmt.Sprintf("e%d-%d", i, j), &specs.Process{Args: []string{"true"}, Env: []string{"PATH=/bin"}, Cwd: "/"}, stdio.IO{}); err == nil {
					_, _ = p.Wait(ctx)
				}
			}
		}()
	}
	wg.Wait()
	pids, err := c.Pids(ctx)
	if err != nil {
		t.Fatalf("the agent does not answer with the guest out of threads: %v", err)
	}
	if len(pids) < 1000 {
		t.Fatalf("the container has %d processes, want it to have forked until refused (over 1000)", len(pids))
	}
	t.Logf("the container forked %d processes", len(pids))
	if err := c.Kill(ctx, uint32(syscall.SIGKILL), true); err != nil {
		t.Fatalf("kill the container's processes: %v", err)
	}
	if _, err := c.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	stdout, stderr, status := v.output(t, "after", v.spec("echo", "alive"))
	if status != 0 || strings.TrimSpace(stdout) != "alive" {
		t.Errorf("a container after the bomb: stdout %q stderr %q status %d, want \"alive\"", stdout, stderr, status)
	}
}
