package integration

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/kiln-runtime/kiln/integration/testbundle"
	"github.com/kiln-runtime/kiln/runtime/stdio"
)

// cgroupV2Tests are vm/child's tests of the VM cgroup that run programs in one.
const cgroupV2Tests = "^(TestStartInCgroupAsUser|TestNewCgroupReplacesAnEmptyStaleOne)$"

// The VM cgroup on cgroup v2, for real. These hosts run cgroup v1, where vm/child's cgroup tests take the v1
// path; the guest mounts cgroup2. So vm/child's tests, built static, run as root in a privileged container of a
// booted pod whose /sys/fs/cgroup is writable, and must find v2 (KILN_TEST_CGROUP_VERSION=2): each creates a
// cgroup with memory.max, starts a program in it (clone3's CLONE_INTO_CGROUP) as another user, checks where it
// and what it forks are, and removes the cgroup. Where cgroup v2 allows no such cgroup, the error says why.
func TestVMCgroupOnCgroupV2(t *testing.T) {
	requireVM(t)
	rootfs := filepath.Join(t.TempDir(), "rootfs")
	if err := testbundle.Rootfs(rootfs); err != nil {
		t.Fatal(err)
	}
	buildTestBinary(t, "./vm/child", filepath.Join(rootfs, "bin", "child.test"))
	v := newContainerVM(t, 256)

	t.Run("beside_a_leaf", func(t *testing.T) {
		// cgroup v2 lets no cgroup that holds processes give the memory controller to its children, so the
		// test moves itself into a leaf first, as the shim sits in a cgroup of its own: the VM cgroup goes
		// beside it, under the container's cgroup (the root of the container's cgroup namespace).
		status, out, errOut := runChildTests(t, v, rootfs, "cgroup-v2", `mkdir /sys/fs/cgroup/test-leaf
echo $$ > /sys/fs/cgroup/test-leaf/cgroup.procs`)
		t.Logf("vm/child's tests in the guest:\n%s", out)
		if status != 0 || !strings.Contains(out, "--- PASS: TestStartInCgroupAsUser") ||
			!strings.Contains(out, "--- PASS: TestNewCgroupReplacesAnEmptyStaleOne") || !strings.Contains(out, "(v2: true)") {
			t.Errorf("vm/child's cgroup tests in the guest: status %d\nstdout:\n%s\nstderr:\n%s", status, out, errOut)
		}
	})
	t.Run("at_a_namespace_root_holding_processes", func(t *testing.T) {
		// The caller is alone at the root of its cgroup namespace, which is not the host's root cgroup: no
		// cgroup can be made there with a memory limit, and the error says why.
		status, out, errOut := runChildTests(t, v, rootfs, "cgroup-v2-root", "")
		t.Logf("vm/child's tests in the guest:\n%s", out)
		if status == 0 || !strings.Contains(out, "it holds processes, and cgroup v2 lets such a cgroup give no controller to its children") {
			t.Errorf("vm/child's cgroup tests at the namespace root: status %d, want a failure that says why\nstdout:\n%s\nstderr:\n%s", status, out, errOut)
		}
	})
}

// runChildTests runs vm/child's cgroup tests (at /bin/child.test in rootfs) as root in a container of v with a
// writable /sys/fs/cgroup, after the shell commands prepare; it returns their exit status and output.
func runChildTests(t *testing.T, v *containerVM, rootfs, id, prepare string) (status uint32, stdout, stderr string) {
	t.Helper()
	spec := v.spec("sh", "-c", "set -e\n"+prepare+"\nexec /bin/child.test -test.v -test.count=1 -test.run '"+cgroupV2Tests+"'")
	spec.Process.Env = append(spec.Process.Env, "KILN_TEST_CGROUP_VERSION=2")
	caps := []string{"CAP_SYS_ADMIN", "CAP_SETUID", "CAP_SETGID", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_KILL"}
	spec.Process.Capabilities = &specs.LinuxCapabilities{Bounding: caps, Effective: caps, Permitted: caps}
	writable := false
	for i, m := range spec.Mounts {
		if m.Destination != "/sys/fs/cgroup" {
			continue
		}
		var opts []string
		for _, o := range m.Options {
			if o != "ro" {
				opts = append(opts, o)
			}
		}
		spec.Mounts[i].Options = append(opts, "rw")
		writable = true
	}
	if !writable {
		t.Fatal("the test spec has no /sys/fs/cgroup mount to make writable")
	}
	var out, errOut bytes.Buffer
	c := v.create(t, id, spec, rootfs, stdio.IO{Stdout: &out, Stderr: &errOut})
	ctx := testCtx(t, 5*time.Minute)
	if err := c.Start(ctx); err != nil {
		t.Fatal(err)
	}
	e, err := c.Wait(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return e.Status, out.String(), errOut.String()
}

// buildTestBinary builds pkg's test binary, static, at out.
func buildTestBinary(t *testing.T, pkg, out string) {
	t.Helper()
	cmd := exec.Command("go", "test", "-c", "-trimpath", "-o", out, pkg)
	cmd.Dir = repoRoot(t)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build the test binary of %s: %v\n%s", pkg, err, b)
	}
}
