package containerd

import (
	"strings"
	"testing"
)

// A smoke run through containerd ContainerdSmokeVersion, the line many Kubernetes nodes run: the shim built
// against ContainerdVersion's libraries serves it too. The full suite runs against ContainerdVersion.
func TestKilnSmokeOlderContainerd(t *testing.T) {
	k := startKilnVersion(t, ContainerdSmokeVersion)
	want := strings.TrimPrefix(ContainerdSmokeVersion, "v")
	if out := k.ctr(t, "version"); !strings.Contains(out, "Server:") || strings.Count(out, want) < 2 {
		t.Fatalf("ctr version does not show client and server at %s:\n%s", ContainerdSmokeVersion, out)
	}
	const id = "kiln-smoke"
	k.runDetached(t, id, nil, sleeper...)
	k.waitStatus(t, id, "RUNNING")

	out, errOut, code := k.ctrCode(t, nil, "tasks", "exec", "--exec-id", "e1", id, "sh", "-c", "echo from-exec; exit 3")
	if code != 3 || strings.TrimSpace(out) != "from-exec" {
		t.Errorf("exec: exit %d (want 3), stdout %q, stderr %q", code, out, errOut)
	}

	k.ctr(t, "tasks", "kill", "--signal", "SIGTERM", id)
	k.waitStatus(t, id, "STOPPED")
	k.ctr(t, "tasks", "delete", id)
	k.ctr(t, "containers", "delete", id)
	if got := k.taskStatus(t, id); got != "" {
		t.Errorf("task %s still listed (%s) after delete", id, got)
	}
	if out := k.ctr(t, "containers", "list", "--quiet"); strings.TrimSpace(out) != "" {
		t.Errorf("containers left after delete: %q", out)
	}
}
