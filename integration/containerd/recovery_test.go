package containerd

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/shim"
)

func TestKilnShimKilled(t *testing.T) {
	k := startKiln(t)
	const id = "kiln-shimkill"
	k.runDetached(t, id, nil, sleeper...)
	k.waitStatus(t, id, "RUNNING")
	// The shim's socket, by containerd's own naming, in the socket directory this containerd names (socket_dir).
	addr, err := shim.CreateSocketAddress(namespaces.WithNamespace(context.Background(), Namespace), k.d.SocketDir(), k.d.Address, id, false)
	if err != nil {
		t.Fatal(err)
	}
	socket := strings.TrimPrefix(addr, "unix://")
	if _, err := os.Stat(socket); err != nil {
		t.Fatalf("the running shim's socket %s: %v", socket, err)
	}
	k.killShim(t, id)
	if st := k.taskStatus(t, id); st != "" && st != "STOPPED" {
		t.Errorf("task status %q after its shim was killed, want STOPPED or gone", st)
	}
	_, _, _ = k.ctrCode(t, nil, "tasks", "delete", id)
	k.ctr(t, "containers", "delete", id)
	if _, err := os.Stat(socket); !os.IsNotExist(err) {
		t.Errorf("socket of the killed shim left behind: %s (%v)", socket, err)
	}
	// checkNoLeftovers (at cleanup) asserts that the VM, virtiofsd, the share's mounts and the state are gone.
}

func TestKilnContainerdRestart(t *testing.T) {
	k := startKiln(t)
	const id = "kiln-survivor"
	k.runDetached(t, id, nil, sleeper...)
	k.waitStatus(t, id, "RUNNING")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := k.d.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	k.waitStatus(t, id, "RUNNING")
	if out := k.ctr(t, "tasks", "exec", "--exec-id", "after-restart", id, "echo", "still-here"); strings.TrimSpace(out) != "still-here" {
		t.Errorf("exec after containerd restart printed %q", out)
	}
	k.ctr(t, "tasks", "kill", "--signal", "SIGTERM", id)
	k.waitStatus(t, id, "STOPPED")
}

func TestKilnCycles(t *testing.T) {
	k := startKiln(t)
	const cycles = 20
	start := time.Now()
	for i := range cycles {
		args := append(append([]string{"run", "--rm"}, KilnRunArgs(k.cfg)...), BusyboxRef, fmt.Sprintf("kiln-cycle-%d", i), "true")
		if _, errOut, code := k.ctrCode(t, nil, args...); code != 0 {
			t.Fatalf("cycle %d: exit %d: %s", i, code, errOut)
		}
	}
	t.Logf("%d run/delete cycles in %s", cycles, time.Since(start))
	if out := k.ctr(t, "containers", "list", "--quiet"); strings.TrimSpace(out) != "" {
		t.Errorf("containers left: %s", out)
	}
	// checkNoLeftovers (at cleanup) asserts zero leftover shims, VM processes, mounts and directories.
}

// event is one line of `ctr events`: topic and payload.
type event struct {
	Topic   string
	Payload map[string]any
}

func parseEvents(out string) []event {
	var evs []event
	for _, line := range strings.Split(out, "\n") {
		// "<timestamp> <namespace> <topic> <json>"
		f := strings.SplitN(line, " ", 6)
		i := strings.Index(line, " /tasks/")
		if len(f) < 4 || i < 0 {
			continue
		}
		rest := strings.TrimSpace(line[i:])
		topic, payload, _ := strings.Cut(rest, " ")
		var p map[string]any
		_ = json.Unmarshal([]byte(payload), &p)
		evs = append(evs, event{Topic: topic, Payload: p})
	}
	return evs
}

func TestKilnEvents(t *testing.T) {
	k := startKiln(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	evCmd := k.d.CtrCommand(ctx, "events")
	var evOut strings.Builder
	evCmd.Stdout = &evOut
	if err := evCmd.Start(); err != nil {
		t.Fatal(err)
	}
	const id = "kiln-events"
	k.runDetached(t, id, nil, sleeper...)
	k.waitStatus(t, id, "RUNNING")
	k.ctr(t, "tasks", "exec", "--exec-id", "ev-exec", id, "true")
	k.ctr(t, "tasks", "pause", id)
	k.ctr(t, "tasks", "resume", id)
	k.ctr(t, "tasks", "kill", "--signal", "SIGTERM", id)
	k.waitStatus(t, id, "STOPPED")
	k.ctr(t, "tasks", "delete", id)
	time.Sleep(500 * time.Millisecond)
	_ = evCmd.Process.Kill()
	_ = evCmd.Wait()

	evs := parseEvents(evOut.String())
	want := []struct {
		topic  string
		fields map[string]any
	}{
		{"/tasks/create", map[string]any{"container_id": id}},
		{"/tasks/start", map[string]any{"container_id": id}},
		{"/tasks/exec-added", map[string]any{"container_id": id, "exec_id": "ev-exec"}},
		{"/tasks/exec-started", map[string]any{"container_id": id, "exec_id": "ev-exec"}},
		{"/tasks/exit", map[string]any{"container_id": id, "id": "ev-exec"}},
		{"/tasks/paused", map[string]any{"container_id": id}},
		{"/tasks/resumed", map[string]any{"container_id": id}},
		{"/tasks/exit", map[string]any{"container_id": id, "id": id, "exit_status": float64(143)}},
		{"/tasks/delete", map[string]any{"container_id": id, "exit_status": float64(143)}},
	}
	i := 0
	for _, e := range evs {
		if i < len(want) && e.Topic == want[i].topic && matches(e.Payload, want[i].fields) {
			if e.Topic != "/tasks/exit" && e.Topic != "/tasks/delete" {
				if pid, ok := e.Payload["pid"]; ok && pid == float64(0) {
					t.Errorf("%s has pid 0", e.Topic)
				}
			}
			i++
		}
	}
	if i < len(want) {
		t.Errorf("event %d (%s %v) not seen in order; events:\n%s", i, want[i].topic, want[i].fields, evOut.String())
	}
}

func matches(payload, fields map[string]any) bool {
	for k, v := range fields {
		if payload[k] != v {
			return false
		}
	}
	return true
}

// killShim SIGKILLs the one task shim of k's containerd, serving task id, and waits for containerd to notice,
// run the dead shim's `delete` for the task, and report its exit: killed (137).
func (k *kilnEnv) killShim(t *testing.T, id string) {
	t.Helper()
	shims := k.d.Shims()
	if len(shims) != 1 {
		t.Fatalf("want one task shim, found %v", shims)
	}
	events := k.followEvents(t)
	if err := syscall.Kill(shims[0], syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	events.waitFor(t, time.Minute, "/tasks/exit", map[string]any{"container_id": id, "exit_status": float64(137)})
	events.stop()
}
