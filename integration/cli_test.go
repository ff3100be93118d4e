package integration

import (
	"encoding/json"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// kilnCLI returns the built kiln binary and a config file whose state directory is private to the test.
func kilnCLI(t *testing.T) (bin, cfgPath, stateRoot string) {
	t.Helper()
	share := requireVM(t)
	bin = filepath.Join(repoRoot(t), "_output", "bin", "kiln")
	if _, err := os.Stat(bin); err != nil {
		t.Fatalf("%v: run `make build`", err)
	}
	stateRoot = t.TempDir()
	cfgPath = filepath.Join(t.TempDir(), "config.toml")
	cfg := fmt.Sprintf("[hypervisor]\nkernel = %q\ninitrd = %q\n[runtime]\nstate_dir = %q\n",
		filepath.Join(share, "vmlinuz"), filepath.Join(share, "initrd.img"), stateRoot)
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	return bin, cfgPath, stateRoot
}

func TestCLIVMBootJSON(t *testing.T) {
	bin, cfg, stateRoot := kilnCLI(t)
	out, err := exec.Command(bin, "--config", cfg, "vm", "boot", "--json").Output()
	if err != nil {
		t.Fatalf("kiln vm boot: %v\n%s", err, stderrOf(err))
	}
	var res struct {
		KernelRelease string  `json:"kernel_release"`
		ReadyMS       float64 `json:"boot_to_agent_ready_ms"`
		AgentVersion  string  `json:"agent_version"`
		Accelerator   string  `json:"accelerator"`
		Translated    int     `json:"translated_blocks"`
		RandomReady   bool    `json:"random_ready"`
		ClockOffsetMS float64 `json:"guest_clock_offset_ms"`
	}
	if err := json.Unmarshal(out, &res); err != nil {
		t.Fatalf("decode %s: %v", out, err)
	}
	want, _ := os.ReadFile(filepath.Join(repoRoot(t), "_output", "share", "kiln", "kernel-release"))
	if res.KernelRelease != strings.TrimSpace(string(want)) || res.KernelRelease == "" {
		t.Errorf("kernel_release %q, want %q", res.KernelRelease, want)
	}
	if res.ReadyMS <= 0 || res.AgentVersion == "" {
		t.Errorf("implausible result %+v", res)
	}
	// The host seeds the guest's entropy and sets its clock as the VM starts. An unset clock reads 1970 (or the
	// kernel's build time), years off; a second covers the answer's way back.
	if !res.RandomReady || math.Abs(res.ClockOffsetMS) > 1000 {
		t.Errorf("random_ready %v, guest clock off by %.1f ms: the guest was not seeded", res.RandomReady, res.ClockOffsetMS)
	}
	// Under TCG the boot's translated code is reported, under KVM nothing.
	if (res.Accelerator == "tcg") != (res.Translated > 10000) {
		t.Errorf("accelerator %q with %d translated blocks", res.Accelerator, res.Translated)
	}
	checkNoLeftovers(t, stateRoot, "boot-")
}

func TestCLICheck(t *testing.T) {
	bin, cfg, _ := kilnCLI(t)
	out, err := exec.Command(bin, "--config", cfg, "check").CombinedOutput()
	if err != nil {
		t.Fatalf("kiln check failed: %v\n%s", err, out)
	}
	for _, want := range []string{"accelerator", "qemu", "virtiofsd", "vsock", "guest", "config"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("kiln check output lacks %q:\n%s", want, out)
		}
	}
	bad := filepath.Join(t.TempDir(), "bad.toml")
	if err := os.WriteFile(bad, []byte("[hypervisor]\npath = \"/nonexistent/qemu\"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err = exec.Command(bin, "--config", bad, "check").CombinedOutput()
	if err == nil {
		t.Fatalf("kiln check passed with a missing QEMU:\n%s", out)
	}
	if !strings.Contains(string(out), "/nonexistent/qemu") {
		t.Errorf("kiln check does not name the missing QEMU:\n%s", out)
	}
}

// When the host process is killed, QEMU dies with it (parent-death signal) and the next Kiln run removes the
// state directory it left.
func TestCLIKilledHostLeavesNoQEMU(t *testing.T) {
	bin, cfg, stateRoot := kilnCLI(t)
	cmd := exec.Command(bin, "--config", cfg, "vm", "boot")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var qemuPid int
	deadline := time.Now().Add(20 * time.Second)
	for qemuPid == 0 && time.Now().Before(deadline) {
		qemuPid = childOf(cmd.Process.Pid, "qemu-system")
		time.Sleep(20 * time.Millisecond)
	}
	if qemuPid == 0 {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		t.Fatal("no QEMU child of kiln appeared")
	}
	_ = cmd.Process.Signal(syscall.SIGKILL)
	_ = cmd.Wait()
	deadline = time.Now().Add(10 * time.Second)
	for processAlive(qemuPid) && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if processAlive(qemuPid) {
		_ = syscall.Kill(qemuPid, syscall.SIGKILL)
		t.Fatalf("QEMU %d outlived its killed parent", qemuPid)
	}
	if out, err := exec.Command(bin, "--config", cfg, "vm", "boot").CombinedOutput(); err != nil {
		t.Fatalf("second kiln vm boot: %v\n%s", err, out)
	}
	checkNoLeftovers(t, stateRoot, "boot-")
}

func childOf(parent int, comm string) int {
	matches, _ := filepath.Glob("/proc/[0-9]*/stat")
	for _, f := range matches {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		// pid (comm) state ppid ...
		s := string(b)
		open, close := strings.IndexByte(s, '('), strings.LastIndexByte(s, ')')
		if open < 0 || close < 0 || !strings.HasPrefix(s[open+1:close], comm) {
			continue
		}
		fields := strings.Fields(s[close+1:])
		if len(fields) > 1 && fields[1] == strconv.Itoa(parent) {
			pid, _ := strconv.Atoi(filepath.Base(filepath.Dir(f)))
			return pid
		}
	}
	return 0
}

func processAlive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	// A zombie has exited; only its parent has not reaped it yet.
	f := statFields(string(b))
	return len(f) == 0 || f[0] != "Z"
}

// statFields are the fields of a /proc stat line after the command name, state first. The name, in parentheses,
// may hold any character: the fields start after the last ')'.
func statFields(stat string) []string {
	return strings.Fields(stat[strings.LastIndexByte(stat, ')')+1:])
}

func stderrOf(err error) string {
	if ee, ok := err.(*exec.ExitError); ok {
		return string(ee.Stderr)
	}
	return ""
}

func TestCLIConfigShow(t *testing.T) {
	bin, cfg, _ := kilnCLI(t)
	out, err := exec.Command(bin, "config", "show", "--config", cfg).CombinedOutput()
	if err != nil {
		t.Fatalf("config show: %v\n%s", err, out)
	}
	for _, want := range []string{"runtime.state_dir = ", "# " + cfg, "hypervisor.memory_mib = 256", "# default"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("config show lacks %q:\n%s", want, out)
		}
	}
	for _, tc := range []struct{ body, want string }{
		{"[hypervisor]\nmemory_mib = \"lots\"\n", "memory_mib"},
		{"[hypervisor]\nmemroy_mib = 512\n", "hypervisor.memroy_mib"},
	} {
		bad := filepath.Join(t.TempDir(), "bad.toml")
		if err := os.WriteFile(bad, []byte(tc.body), 0o644); err != nil {
			t.Fatal(err)
		}
		out, err := exec.Command(bin, "config", "show", "--config", bad).CombinedOutput()
		if err == nil || !strings.Contains(string(out), tc.want) || !strings.Contains(string(out), bad) {
			t.Errorf("config show of %q: err %v, output does not name %q and the file:\n%s", tc.body, err, tc.want, out)
		}
	}
}

// A kiln binary and a guest image from different versions are detected at VM start and reported.
func TestCLIVersionMismatchReported(t *testing.T) {
	_, cfg, _ := kilnCLI(t)
	bin := filepath.Join(t.TempDir(), "kiln")
	build := exec.Command("go", "build", "-trimpath", "-ldflags", "-X main.version=v0.0.0-mismatch", "-o", bin, "./cmd/kiln")
	build.Dir = repoRoot(t)
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build kiln: %v\n%s", err, out)
	}
	out, err := exec.Command(bin, "--config", cfg, "vm", "boot").CombinedOutput()
	if err != nil {
		t.Fatalf("kiln vm boot: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "differs from host Kiln version v0.0.0-mismatch") {
		t.Fatalf("no version mismatch reported:\n%s", out)
	}
}
