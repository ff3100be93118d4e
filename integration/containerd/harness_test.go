package containerd

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// toolsBuildTimeout bounds building the tools of one containerd version when they are not cached yet.
const toolsBuildTimeout = 25 * time.Minute

// startDaemon builds the tools (cached in _output/tools/bin), starts a private containerd ContainerdVersion with
// the Kiln shim directory first on its PATH, imports busybox, and stops it all when the test ends, failing the
// test on leftovers.
func startDaemon(t *testing.T, opts Options) *Daemon {
	t.Helper()
	return startDaemonVersion(t, ContainerdVersion, opts)
}

// startDaemonVersion is startDaemon with containerd and ctr of another version.
func startDaemonVersion(t *testing.T, version string, opts Options) *Daemon {
	t.Helper()
	RequireRoot(t, "containerd")
	root := RepoRoot(t)
	// Building containerd, ctr and runc the first time takes minutes, many on a loaded 2-core machine.
	buildCtx, cancelBuild := context.WithTimeout(context.Background(), toolsBuildTimeout)
	defer cancelBuild()
	tools, err := EnsureToolsFor(buildCtx, root, filepath.Join(root, "_output", "tools", "bin"), version)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	opts.Tools = tools
	opts.Debug = true
	d, err := Start(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			kept, err := d.KeepLogs(t.Name())
			t.Logf("containerd log (tail):\n%s\ncontainerd's whole log and the VM consoles are kept in %s (%v)", d.LogTail(80), kept, err)
		}
		if err := d.Stop(context.Background()); err != nil {
			t.Errorf("stop containerd: %v", err)
		}
	})
	if err := d.ImportBusybox(ctx); err != nil {
		t.Fatal(err)
	}
	return d
}

// ctr runs ctr and fails the test on error.
func ctr(t *testing.T, d *Daemon, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	out, err := d.Ctr(ctx, args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// exitCode is a finished command's exit status (-1 when it did not run).
func exitCode(err error) int {
	if err == nil {
		return 0
	}
	if ee, ok := err.(*exec.ExitError); ok {
		return ee.ExitCode()
	}
	return -1
}

func TestRuncBaseline(t *testing.T) {
	d := startDaemon(t, Options{})
	out := ctr(t, d, "run", "--rm", BusyboxRef, "runc-baseline", "uname", "-r")
	host, err := os.ReadFile("/proc/sys/kernel/osrelease")
	if err != nil {
		t.Fatal(err)
	}
	if got, want := strings.TrimSpace(out), strings.TrimSpace(string(host)); got != want {
		t.Errorf("runc container kernel release %q, want the host's %q", got, want)
	}
	ctx := context.Background()
	cmd := d.CtrCommand(ctx, "run", "--rm", BusyboxRef, "runc-exit", "sh", "-c", "exit 7")
	if code := exitCode(cmd.Run()); code != 7 {
		t.Errorf("exit status through ctr run: got %d, want 7", code)
	}
}
