package containerd

import (
	"context"
	"encoding/json"
	"io"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/console"
)

// sleeper is a container init that ends on SIGTERM: a shell as pid 1 ignores signals it has no trap for.
var sleeper = []string{"sh", "-c", "trap 'exit 143' TERM; while true; do sleep 1; done"}

func TestKilnStdinPiped(t *testing.T) {
	k := startKiln(t)
	in := strings.Repeat("line of input\n", 1000)
	args := append(append([]string{"run", "--rm"}, KilnRunArgs(k.cfg)...), BusyboxRef, "kiln-stdin", "sh", "-c", "wc -l; exit 3")
	out, errOut, code := k.ctrCode(t, strings.NewReader(in), args...)
	if code != 3 {
		t.Fatalf("exit %d, want 3; stderr: %s", code, errOut)
	}
	if got := strings.TrimSpace(out); got != "1000" {
		t.Errorf("lines the container read from stdin: %q, want 1000", got)
	}
}

func TestKilnInteractiveTTY(t *testing.T) {
	k := startKiln(t)
	master, slave, err := console.NewPty()
	if err != nil {
		t.Fatal(err)
	}
	defer master.Close()
	sf, err := os.OpenFile(slave, os.O_RDWR|syscall.O_NOCTTY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer sf.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	args := append(append([]string{"run", "--rm", "-t"}, KilnRunArgs(k.cfg)...), BusyboxRef, "kiln-tty", "sh")
	cmd := k.d.CtrCommand(ctx, args...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = sf, sf, sf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Setctty: true, Ctty: 0}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	// The shell reads its commands through the guest's pty: `tty` names it, and the exit status comes back.
	if _, err := io.WriteString(master, "tty; echo marker-$((6*7)); exit 5\n"); err != nil {
		t.Fatal(err)
	}
	seen, ok := readUntil(master, "marker-42", time.Minute)
	if !ok {
		t.Fatalf("no marker through the terminal; saw:\n%s", seen)
	}
	if !strings.Contains(seen, "/dev/pts/") {
		t.Errorf("`tty` in the container did not name a pty; saw:\n%s", seen)
	}
	if code := exitCode(cmd.Wait()); code != 5 {
		t.Errorf("exit status of the interactive run: %d, want 5", code)
	}
}

func TestKilnDetachedLifecycle(t *testing.T) {
	k := startKiln(t)
	const id = "kiln-detached"
	k.runDetached(t, id, nil, "sh", "-c", "trap 'exit 143' TERM; i=0; while true; do echo tick$i; i=$((i+1)); sleep 1; done")
	k.waitStatus(t, id, "RUNNING")

	t.Run("exec", func(t *testing.T) {
		out, errOut, code := k.ctrCode(t, nil, "tasks", "exec", "--exec-id", "e1", id, "sh", "-c", "echo from-exec; echo to-stderr >&2; exit 4")
		if code != 4 {
			t.Errorf("exec exit status %d, want 4 (stderr %q)", code, errOut)
		}
		if strings.TrimSpace(out) != "from-exec" || !strings.Contains(errOut, "to-stderr") {
			t.Errorf("exec output %q, stderr %q", out, errOut)
		}
	})
	t.Run("ps", func(t *testing.T) {
		// The processes run in the guest: containerd gets the task's pid on the host (its stand-in's) for the
		// container, and again for each exec that runs, with its exec id.
		var pid string
		for _, line := range strings.Split(k.ctr(t, "tasks", "ls"), "\n") {
			if f := strings.Fields(line); len(f) >= 2 && f[0] == id {
				pid = f[1]
			}
		}
		k.ctr(t, "tasks", "exec", "--detach", "--exec-id", "e2", id, "sleep", "600")
		out := k.ctr(t, "tasks", "ps", id)
		lines := strings.Split(strings.TrimSpace(out), "\n")[1:]
		if len(lines) != 2 || !strings.Contains(lines[1], "e2") {
			t.Errorf("ctr task ps: want the container and exec e2, got:\n%s", out)
		}
		for _, line := range lines {
			if f := strings.Fields(line); len(f) == 0 || f[0] != pid {
				t.Errorf("ctr task ps lists %q, want the task's pid %s", line, pid)
			}
		}
		// Ended for the subtests after it; the container's removal takes it with it in any case.
		_, _, _ = k.ctrCode(t, nil, "tasks", "kill", "--exec-id", "e2", "--signal", "SIGKILL", id)
	})
	t.Run("metrics", func(t *testing.T) {
		out := k.ctr(t, "tasks", "metrics", id)
		v, err := strconv.ParseUint(metricValue(out, "memory.usage"), 10, 64)
		if err != nil || v == 0 {
			t.Errorf("memory.usage %d (%v) in:\n%s", v, err, out)
		}
		// The guest's peaks and pressure figures reach containerd, and no limit reads as containerd's "max".
		var m struct {
			Memory struct {
				UsageLimit uint64          `json:"usage_limit"`
				MaxUsage   uint64          `json:"max_usage"`
				PSI        json.RawMessage `json:"psi"`
			} `json:"memory"`
			CPU struct {
				PSI json.RawMessage `json:"psi"`
			} `json:"cpu"`
		}
		out = k.ctr(t, "tasks", "metrics", "--format", "json", id)
		if err := json.Unmarshal([]byte(out), &m); err != nil {
			t.Fatalf("ctr tasks metrics --format json: %v\n%s", err, out)
		}
		if m.Memory.UsageLimit != math.MaxUint64 || m.Memory.MaxUsage == 0 || len(m.Memory.PSI) == 0 || len(m.CPU.PSI) == 0 {
			t.Errorf("metrics: memory limit %d (want %d, no limit), peak %d, memory pressure %s, CPU pressure %s; want a peak and pressure:\n%s",
				m.Memory.UsageLimit, uint64(math.MaxUint64), m.Memory.MaxUsage, m.Memory.PSI, m.CPU.PSI, out)
		}
	})
	t.Run("pause-resume", func(t *testing.T) {
		k.ctr(t, "tasks", "pause", id)
		k.waitStatus(t, id, "PAUSED")
		if _, _, code := k.ctrCode(t, nil, "tasks", "pause", id); code == 0 {
			t.Error("pausing a paused task succeeded")
		}
		k.ctr(t, "tasks", "resume", id)
		k.waitStatus(t, id, "RUNNING")
	})
	t.Run("attach", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		cmd := k.d.CtrCommand(ctx, "tasks", "attach", id)
		out, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
		if seen, ok := readUntil(out, "tick", 30*time.Second); !ok {
			t.Errorf("attach saw no output; got %q", seen)
		}
	})
	t.Run("kill-TERM", func(t *testing.T) {
		k.ctr(t, "tasks", "kill", "--signal", "SIGTERM", id)
		k.waitStatus(t, id, "STOPPED")
		if _, _, code := k.ctrCode(t, nil, "tasks", "resume", id); code == 0 {
			t.Error("resuming a stopped task succeeded")
		}
		k.ctr(t, "tasks", "delete", id)
	})
}

func TestKilnTwoContainers(t *testing.T) {
	k := startKiln(t)
	for _, id := range []string{"kiln-a", "kiln-b"} {
		k.runDetached(t, id, []string{"--hostname", id}, sleeper...)
	}
	for _, id := range []string{"kiln-a", "kiln-b"} {
		k.waitStatus(t, id, "RUNNING")
		if out := k.ctr(t, "tasks", "exec", "--exec-id", "h", id, "hostname"); strings.TrimSpace(out) != id {
			t.Errorf("hostname in %s: %q", id, out)
		}
	}
	if n := len(k.d.Shims()); n != 2 {
		t.Errorf("%d shims for two containers without a pod, want 2 (one VM each)", n)
	}
}

func TestKilnBindMountAndReadOnly(t *testing.T) {
	k := startKiln(t)
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "hello"), []byte("from the host\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	run := func(id string, extra []string, cmd ...string) (string, int) {
		args := append(append([]string{"run", "--rm"}, KilnRunArgs(k.cfg)...), extra...)
		args = append(append(args, BusyboxRef, id), cmd...)
		out, _, code := k.ctrCode(t, nil, args...)
		return out, code
	}
	bind := []string{"--mount", "type=bind,src=" + dir + ",dst=/mnt/host,options=rbind:ro"}
	if out, code := run("kiln-bind", bind, "cat", "/mnt/host/hello"); code != 0 || out != "from the host\n" {
		t.Errorf("bind mount: exit %d, read %q", code, out)
	}
	if _, code := run("kiln-bind-ro", bind, "touch", "/mnt/host/new"); code == 0 {
		t.Error("wrote into a read-only bind mount")
	}
	if _, code := run("kiln-rw", nil, "touch", "/newfile"); code != 0 {
		t.Errorf("touch in a writable rootfs: exit %d", code)
	}
	if _, code := run("kiln-ro", []string{"--read-only"}, "touch", "/newfile"); code == 0 {
		t.Error("wrote into a --read-only rootfs")
	}
}
