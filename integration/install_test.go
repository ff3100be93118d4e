package integration

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/kiln-runtime/kiln/integration/testbundle"
)

// An install into a fresh prefix boots a guest with only the installed files and no configuration, and
// uninstall removes exactly what install added, the templates built from it, and the leases of QEMU ids no VM
// holds.
func TestInstallPrefix(t *testing.T) {
	requireVM(t)
	root := repoRoot(t)
	// Readable by everyone, as /usr/local is: QEMU must reach the installed guest kernel and initrd.
	prefix := testbundle.PublicDir(t)
	// Not the machine's template directory: other packages' tests use it while this one runs.
	templates := filepath.Join(t.TempDir(), "templates")
	// Nor the machine's leases of QEMU's ids, which other packages' VMs hold while this one runs.
	leases := filepath.Join(t.TempDir(), "qemu-ids")
	mk := func(target string) {
		t.Helper()
		// Nor the machine's spare directory: other packages' containerds claim slots in it while this one runs.
		cmd := exec.Command("make", target, "PREFIX="+prefix, "TEMPLATE_DIR="+templates, "SPARE_PURGE=", "LEASE_DIR="+leases)
		cmd.Dir = root
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("make %s: %v\n%s", target, err, out)
		}
	}
	mk("install")
	kiln := filepath.Join(prefix, "bin", "kiln")
	out, err := exec.Command(kiln, "version").Output()
	if err != nil {
		t.Fatalf("kiln version: %v", err)
	}
	if !strings.Contains(string(out), filepath.Join(prefix, "share", "kiln")) {
		t.Fatalf("installed kiln does not use the installed guest image:\n%s", out)
	}
	want, err := os.ReadFile(filepath.Join(prefix, "share", "kiln", "kernel-release"))
	if err != nil {
		t.Fatal(err)
	}
	cfg := filepath.Join(t.TempDir(), "config.toml")
	// Only the state directory is private to the test; the guest assets come from the installed tree.
	if err := os.WriteFile(cfg, []byte("[runtime]\nstate_dir = \""+t.TempDir()+"\"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err = exec.Command(kiln, "--config", cfg, "vm", "boot", "--json").Output()
	if err != nil {
		t.Fatalf("installed kiln vm boot: %v\n%s", err, stderrOf(err))
	}
	var res struct {
		KernelRelease string `json:"kernel_release"`
	}
	if err := json.Unmarshal(out, &res); err != nil || res.KernelRelease != strings.TrimSpace(string(want)) {
		t.Fatalf("kernel release %q (%v), want %q", res.KernelRelease, err, want)
	}
	if err := os.MkdirAll(filepath.Join(templates, "a-template"), 0o755); err != nil {
		t.Fatal(err)
	}
	// A killed shim's lease, which no one holds, and one a running VM's shim holds.
	stale, held := filepath.Join(leases, "100000"), filepath.Join(leases, "100001")
	if err := os.MkdirAll(leases, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(stale, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	holder, err := os.OpenFile(held, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer holder.Close()
	if err := unix.Flock(int(holder.Fd()), unix.LOCK_EX); err != nil {
		t.Fatal(err)
	}
	mk("uninstall")
	if _, err := os.Stat(stale); !os.IsNotExist(err) {
		t.Errorf("uninstall left the lease no one holds, %s (%v)", stale, err)
	}
	if _, err := os.Stat(held); err != nil {
		t.Errorf("uninstall removed the lease a VM holds, %s: %v", held, err)
	}
	// The VM's shim ends without removing its lease (it was killed): the next uninstall removes the directory.
	holder.Close()
	mk("uninstall")
	if _, err := os.Stat(leases); !os.IsNotExist(err) {
		t.Errorf("uninstall left the leases' directory %s (%v)", leases, err)
	}
	if _, err := os.Stat(templates); !os.IsNotExist(err) {
		t.Fatalf("uninstall left the template directory %s (%v)", templates, err)
	}
	var left []string
	_ = filepath.Walk(prefix, func(path string, info os.FileInfo, err error) error {
		if err == nil && !info.IsDir() {
			left = append(left, path)
		}
		return nil
	})
	if len(left) > 0 {
		t.Fatalf("uninstall left %v", left)
	}
}
