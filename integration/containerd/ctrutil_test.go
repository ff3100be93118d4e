package containerd

import (
	"bufio"
	"context"
	"io"
	"regexp"
	"strings"
	"testing"
	"time"

	runtimeoptions "github.com/containerd/containerd/api/types/runtimeoptions/v1"
	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/oci"
)

// ctrCode runs ctr with stdin and returns stdout, stderr and the exit code; it fails the test only when ctr
// could not run at all.
func (k *kilnEnv) ctrCode(t *testing.T, stdin io.Reader, args ...string) (string, string, int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := k.d.CtrCommand(ctx, args...)
	cmd.Stdin = stdin
	var stdout, stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	code := exitCode(cmd.Run())
	if code < 0 {
		t.Fatalf("ctr %v did not run: %s", args, stderr.String())
	}
	return stdout.String(), stderr.String(), code
}

// ctr runs ctr and fails the test unless it exits 0.
func (k *kilnEnv) ctr(t *testing.T, args ...string) string {
	t.Helper()
	out, errOut, code := k.ctrCode(t, nil, args...)
	if code != 0 {
		t.Fatalf("ctr %v: exit %d: %s", args, code, errOut)
	}
	return out
}

// runDetached starts a container with Kiln in the background (`ctr run -d`) and registers its removal.
func (k *kilnEnv) runDetached(t *testing.T, id string, extra []string, cmd ...string) {
	t.Helper()
	args := append([]string{"run", "-d"}, KilnRunArgs(k.cfg)...)
	args = append(args, extra...)
	args = append(args, BusyboxRef, id)
	k.ctr(t, append(args, cmd...)...)
	t.Cleanup(func() { k.remove(t, id) })
}

// remove kills and deletes a container and its task, ignoring what is already gone. It runs as a cleanup, also
// after a test stopped half-way, so it does not stop at the first step that fails: a task that does not stop is
// deleted by force, and one that is still listed at the end is an error, since its shim and VM would outlive
// the test.
func (k *kilnEnv) remove(t *testing.T, id string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var st string
	if _, err := k.d.Ctr(ctx, "tasks", "kill", "--signal", "SIGKILL", id); err == nil {
		st, _ = k.pollStatus(t, id, 30*time.Second, func(st string) bool { return st != "RUNNING" })
	} else {
		st = k.taskStatus(t, id)
	}
	if st != "" {
		_, _ = k.d.Ctr(ctx, "tasks", "delete", "--force", id)
	}
	_, _ = k.d.Ctr(ctx, "containers", "delete", id)
	if st := k.taskStatus(t, id); st != "" {
		t.Errorf("cleanup: task %s is still %s after kill and delete --force", id, st)
	}
}

// taskStatus is the STATUS column of `ctr task ls` for id, empty when the task is not listed.
func (k *kilnEnv) taskStatus(t *testing.T, id string) string {
	t.Helper()
	out, _, _ := k.ctrCode(t, nil, "tasks", "ls")
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) >= 3 && f[0] == id {
			return f[2]
		}
	}
	return ""
}

// waitStatus waits until the task has the status, failing the test after 30 s.
func (k *kilnEnv) waitStatus(t *testing.T, id, status string) {
	t.Helper()
	k.waitStatusWithin(t, id, status, 30*time.Second)
}

// pollStatus polls the status of id's task (empty when containerd does not list it) until done accepts it or
// timeout has passed, and returns the last status seen and whether done accepted it.
func (k *kilnEnv) pollStatus(t *testing.T, id string, timeout time.Duration, done func(status string) bool) (string, bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		st := k.taskStatus(t, id)
		if done(st) {
			return st, true
		}
		if time.Now().After(deadline) {
			return st, false
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// metricValue finds `name value` in ctr's metrics table.
func metricValue(table, name string) string {
	re := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(name) + `\s+(\S+)`)
	m := re.FindStringSubmatch(table)
	if m == nil {
		return ""
	}
	return m[1]
}

// readUntil reads lines from r until one contains want or the timeout passes; it returns what it read.
func readUntil(r io.Reader, want string, timeout time.Duration) (string, bool) {
	lines := make(chan string)
	go func() {
		sc := bufio.NewScanner(r)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
	}()
	var seen strings.Builder
	t := time.After(timeout)
	for {
		select {
		case l, ok := <-lines:
			if !ok {
				return seen.String(), false
			}
			seen.WriteString(l + "\n")
			if strings.Contains(l, want) {
				go func() {
					for range lines {
					}
				}()
				return seen.String(), true
			}
		case <-t:
			return seen.String(), false
		}
	}
}

// newContainer creates container id from the busybox image with Kiln as its runtime, its spec the image's
// changed by opts, through a client of its own, and registers its removal.
func (k *kilnEnv) newContainer(ctx context.Context, t *testing.T, id string, opts ...oci.SpecOpts) client.Container {
	t.Helper()
	c, err := client.New(k.d.Address, client.WithDefaultNamespace(Namespace))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	img, err := c.GetImage(ctx, BusyboxRef)
	if err != nil {
		t.Fatal(err)
	}
	ctr, err := c.NewContainer(ctx, id,
		client.WithImage(img), client.WithNewSnapshot(id+"-snap", img),
		client.WithRuntime(RuntimeName, &runtimeoptions.Options{ConfigPath: k.cfg}),
		client.WithNewSpec(append([]oci.SpecOpts{oci.WithImageConfig(img)}, opts...)...))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { k.remove(t, id) })
	return ctr
}
