package child

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// schedPolicy is field 41 of a /proc/<pid>/stat line: the scheduling policy (0 normal, 3 batch).
func schedPolicy(t *testing.T, stat string) string {
	t.Helper()
	// The name, in parentheses, may hold any character: the fields start after the last ')'.
	end := strings.LastIndexByte(stat, ')')
	f := strings.Fields(stat[end+1:])
	if end < 0 || len(f) < 39 {
		t.Fatalf("unexpected stat line %q", stat)
	}
	return f[38]
}

func TestBatch(t *testing.T) {
	for _, tc := range []struct {
		batch bool
		want  string
	}{{false, "0"}, {true, "3"}} {
		var stdout bytes.Buffer
		// The program's own policy, and that of a process it forks (QEMU's threads inherit it the same way).
		cfg := shell(`cat /proc/self/stat; sh -c 'cat /proc/self/stat'`)
		cfg.Stdout = &stdout
		cfg.Batch = tc.batch
		waitExited(t, start(t, cfg))
		lines := strings.Split(strings.TrimSpace(stdout.String()), "\n")
		if len(lines) != 2 {
			t.Fatalf("batch %v: output %q", tc.batch, stdout.String())
		}
		for _, l := range lines {
			if got := schedPolicy(t, l); got != tc.want {
				t.Errorf("batch %v: policy %s, want %s (%q)", tc.batch, got, tc.want, l)
			}
		}
	}
	// The forking thread went back to the normal policy: none of the test's threads is left batch.
	tasks, err := filepath.Glob("/proc/self/task/*/stat")
	if err != nil {
		t.Fatal(err)
	}
	for _, task := range tasks {
		b, err := os.ReadFile(task)
		if err != nil {
			continue // the thread ended
		}
		if got := schedPolicy(t, string(b)); got != "0" {
			t.Errorf("%s: policy %s after Start, want 0", task, got)
		}
	}
}

// failingSched is a thread whose scheduling attributes cannot be read or set, as under a seccomp filter that
// refuses sched_getattr or sched_setattr; what it does not refuse reaches the kernel.
type failingSched struct{ getErr, setErr error }

func (f failingSched) get() (*unix.SchedAttr, error) {
	if f.getErr != nil {
		return nil, f.getErr
	}
	return threadSched{}.get()
}

func (f failingSched) set(a *unix.SchedAttr) error {
	if f.setErr != nil {
		return f.setErr
	}
	return threadSched{}.set(a)
}

func TestBatchRefusedStartsAllTheSame(t *testing.T) {
	for _, tc := range []struct {
		name  string
		attrs schedAttrs
	}{
		{"get refused", failingSched{getErr: unix.EPERM}},
		{"set refused", failingSched{setErr: unix.ENOSYS}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			started := false
			schedErr, err := startBatch(func() error { started = true; return nil }, tc.attrs)
			if err != nil || !started {
				t.Fatalf("start ran %v, error %v", started, err)
			}
			if schedErr == nil {
				t.Error("no error for the policy that could not be set")
			}
		})
	}
}
