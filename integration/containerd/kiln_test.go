package containerd

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// kilnEnv is a private containerd with the Kiln shim built from this tree on its PATH.
type kilnEnv struct {
	d      *Daemon
	cfg    string
	assets string
	// shimDir holds the shim binary containerd runs (and that network namespace holders re-execute).
	shimDir string
	// nets are the network namespaces of the running test's pods (podNet), checked by checkNothingLeft.
	nets []watchedNet
	// netSeq numbers the namespaces podNet made, so each has its own name, bridge and subnet.
	netSeq int
}

// startKiln builds the shim, starts a private containerd that finds it, and writes the Kiln configuration.
// At the end it checks that nothing Kiln made is left: shims, QEMU, virtiofsd, mounts, state.
func startKiln(t *testing.T) *kilnEnv {
	t.Helper()
	return startKilnVersion(t, ContainerdVersion)
}

// startKilnVersion is startKiln with containerd and ctr of another version.
func startKilnVersion(t *testing.T, version string) *kilnEnv {
	t.Helper()
	RequireRoot(t, "containerd")
	root := RepoRoot(t)
	assets := filepath.Join(root, "_output", "share", "kiln")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	shimDir, err := BuildShim(ctx, root, filepath.Join(t.TempDir(), "bin"))
	if err != nil {
		t.Fatal(err)
	}
	d := startDaemonVersion(t, version, Options{Path: []string{shimDir}})
	cfg, err := d.KilnConfig(assets, "")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { checkNoLeftovers(t, d) })
	return &kilnEnv{d: d, cfg: cfg, assets: assets, shimDir: shimDir}
}

// checkNoLeftovers runs before the daemon's own cleanup (cleanups run last-registered first).
func checkNoLeftovers(t *testing.T, d *Daemon) {
	t.Helper()
	if t.Failed() {
		return
	}
	for _, l := range leftovers(d) {
		t.Error(l)
	}
}

// leftovers lists what Kiln left on the host once this containerd's tasks are deleted: spares whose programs stand
// still (a hold never let go), and after stopping the spares, shims still running after they had time to exit,
// processes naming Kiln's state, mounts under it, entries in it, host cgroups below the harness's namespace (where
// the shims account their VMs).
func leftovers(d *Daemon) []string {
	// A spare stands still only while a task starts beside it: none may be left so once the tasks are gone.
	found := HeldSpares(d.Address)
	if err := StopSpare(d.Address, time.Minute); err != nil {
		found = append(found, err.Error())
	}
	if pids := d.WaitShimsGone(context.Background(), shimExitTimeout); len(pids) > 0 {
		found = append(found, fmt.Sprintf("shims still running after their tasks were deleted:%s\nspare slots:%s", describe(pids), sparesSeen()))
	}
	if pids := ProcessesMatching(d.StateDir()); len(pids) > 0 {
		found = append(found, fmt.Sprintf("processes still using Kiln state %s:%s\nspare slots:%s", d.StateDir(), describe(pids), sparesSeen()))
	}
	if points, _ := MountsUnder(d.StateDir()); len(points) > 0 {
		found = append(found, fmt.Sprintf("mounts left under %s: %v", d.StateDir(), points))
	}
	if entries, err := os.ReadDir(d.StateDir()); err == nil && len(entries) > 0 {
		var names []string
		for _, e := range entries {
			names = append(names, e.Name())
		}
		found = append(found, fmt.Sprintf("Kiln state left in %s: %v", d.StateDir(), names))
	}
	if cgroups := pathsBelow(namespaceCgroup(), true); len(cgroups) > 0 {
		found = append(found, fmt.Sprintf("host cgroups left below %s: %v", namespaceCgroup(), cgroups))
	}
	return found
}

// run runs `ctr run` with Kiln and returns stdout, stderr and the exit code.
func (k *kilnEnv) run(t *testing.T, args ...string) (string, string, int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	full := append([]string{"run"}, KilnRunArgs(k.cfg)...)
	full = append(full, args...)
	cmd := k.d.CtrCommand(ctx, full...)
	var stdout, stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	code := exitCode(err)
	if code < 0 {
		t.Fatalf("ctr %v: %v\n%s", full, err, stderr.String())
	}
	return stdout.String(), stderr.String(), code
}

func TestKilnRunRm(t *testing.T) {
	k := startKiln(t)
	want, err := GuestKernelRelease(k.assets)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	out, errOut, code := k.run(t, "--rm", BusyboxRef, "kiln-uname", "uname", "-r")
	t.Logf("ctr run --rm uname -r: %s", time.Since(start))
	if code != 0 {
		t.Fatalf("exit %d, stderr: %s", code, errOut)
	}
	if got := strings.TrimSpace(out); got != want {
		t.Errorf("kernel release in the container: %q, want the guest's %q", got, want)
	}
	_, _, code = k.run(t, "--rm", BusyboxRef, "kiln-exit", "sh", "-c", "echo out; echo err >&2; exit 7")
	if code != 7 {
		t.Errorf("exit status through ctr run: got %d, want 7", code)
	}
}

// TestKilnEngineDefaultAppArmorProfile: the default AppArmor profile containerd's CRI puts on every container
// of a host where AppArmor is on (a pod's RuntimeDefault) is no choice of the user's, and the VM is a Kiln
// container's default confinement: with the default configuration (runtime.host_lsm = "refuse") the container
// and an exec in it, whose process ctr copies profile and all, run. A profile the user named is refused
// (TestKilnBadInput).
func TestKilnEngineDefaultAppArmorProfile(t *testing.T) {
	k := startKiln(t)
	const id = "kiln-lsm-default"
	k.runDetached(t, id, []string{"--apparmor-profile", "cri-containerd.apparmor.d"}, "sleep", "3600")
	k.waitStatus(t, id, "RUNNING")
	if out, errOut, code := k.ctrCode(t, nil, "tasks", "exec", "--exec-id", "e1", id, "echo", "exec ran"); code != 0 || strings.TrimSpace(out) != "exec ran" {
		t.Errorf("exec in a container with CRI's default profile: exit %d, stdout %q, stderr %s", code, out, errOut)
	}
}

// TestKilnHostLSMIgnored: with runtime.host_lsm = "ignore", a container whose spec names an AppArmor profile (as
// containerd's CRI gives every container where AppArmor is on) runs, and so does an exec in it, whose process
// spec ctr copies from the container's, profile and all. The default configuration refuses both
// (TestKilnBadInput).
func TestKilnHostLSMIgnored(t *testing.T) {
	k := startKiln(t)
	cfg, err := k.d.KilnConfig(k.assets, "[runtime]\nhost_lsm = \"ignore\"\n")
	if err != nil {
		t.Fatal(err)
	}
	k.cfg = cfg
	const id = "kiln-lsm"
	k.runDetached(t, id, []string{"--apparmor-profile", "kiln-test-profile"}, "sleep", "3600")
	k.waitStatus(t, id, "RUNNING")
	if out, errOut, code := k.ctrCode(t, nil, "tasks", "exec", "--exec-id", "e1", id, "echo", "exec ran"); code != 0 || strings.TrimSpace(out) != "exec ran" {
		t.Errorf("exec in a container with an ignored profile: exit %d, stdout %q, stderr %s", code, out, errOut)
	}
	if log := k.logSince(t, 0); !strings.Contains(log, "host LSM settings taken out") || !strings.Contains(log, "kiln-test-profile") {
		t.Errorf("the shim log does not say which host LSM settings it took out")
	}
}
