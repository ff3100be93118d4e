package integration

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kiln-runtime/kiln/config"
	"github.com/kiln-runtime/kiln/vm/accel"
	"github.com/kiln-runtime/kiln/vm/qemu"
)

// Finding 6: QEMU ran as root without -sandbox, and QEMU and virtiofsd were charged to no cgroup of their own.
// A booted VM's QEMU now runs with the seccomp sandbox as an unprivileged user, opens no socket by path, and
// shares a cgroup with virtiofsd whose memory limit is guest RAM plus the overhead; after Stop the cgroup and
// every process are gone. Under TCG its threads run with SCHED_BATCH.
func TestQEMUIsSandboxedUnprivilegedAndInItsCgroup(t *testing.T) {
	share := requireVM(t)
	if os.Geteuid() != 0 {
		t.Skip("needs root to switch QEMU's user and create cgroups")
	}
	exported, err := os.MkdirTemp("", "kiln-it-export-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(exported) })
	var kind accel.Kind
	m := testMachine(t, filepath.Join(share, "vmlinuz"), filepath.Join(share, "initrd.img"), func(c *qemu.Config) {
		kind = c.Accel
		c.User = &syscall.Credential{Uid: 65534, Gid: 65534}
		c.Cgroup = true
		c.SharedDir = exported
	})
	sb := startSandbox(t, m, 60*time.Second)
	if _, err := sb.GuestInfo(context.Background()); err != nil {
		t.Fatalf("guest info: %v", err)
	}
	pid := strconv.Itoa(m.PID())

	cmdline := readProc(t, "/proc/"+pid+"/cmdline")
	if !strings.Contains(cmdline, "-sandbox\x00on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny\x00") {
		t.Errorf("QEMU's command line lacks the sandbox: %q", cmdline)
	}
	status := readProc(t, "/proc/"+pid+"/status")
	for _, want := range []string{"Uid:\t65534\t65534\t65534\t65534", "Gid:\t65534\t65534\t65534\t65534", "Seccomp:\t2"} {
		if !strings.Contains(status, want) {
			t.Errorf("QEMU's status lacks %q:\n%s", want, status)
		}
	}
	if cw, err := os.Readlink("/proc/" + pid + "/cwd"); err != nil || cw != "/" {
		t.Errorf("QEMU's working directory %q (%v), want /", cw, err)
	}
	// Under TCG every thread of QEMU's, the vCPUs above all, runs with SCHED_BATCH (3); under KVM with the
	// normal policy (0). The policy is field 41 of a thread's stat line, the 39th after its name.
	wantPolicy := "0"
	if kind == accel.TCG {
		wantPolicy = "3"
	}
	tasks, _ := filepath.Glob("/proc/" + pid + "/task/*/stat")
	if len(tasks) < 2 {
		t.Errorf("QEMU has %d threads", len(tasks))
	}
	for _, task := range tasks {
		b, err := os.ReadFile(task)
		if err != nil {
			continue // the thread ended
		}
		if f := statFields(string(b)); len(f) < 39 || f[38] != wantPolicy {
			t.Errorf("%s: scheduling policy of %q, want %s under %s", task, b, wantPolicy, kind)
		}
	}

	cg := m.CgroupPath()
	if cg == "" || !strings.HasSuffix(cg, "kiln-vm-"+m.ID()) {
		t.Fatalf("cgroup path %q", cg)
	}
	if !strings.Contains(readProc(t, "/proc/"+pid+"/cgroup"), "/kiln-vm-"+m.ID()+"\n") {
		t.Errorf("QEMU is not in its cgroup: %s", readProc(t, "/proc/"+pid+"/cgroup"))
	}
	limFile := "memory.limit_in_bytes"
	if _, err := os.Stat(filepath.Join(cg, "memory.max")); err == nil {
		limFile = "memory.max"
	}
	want := strconv.Itoa((256 + config.DefaultMemoryOverheadMiB) << 20)
	if got := strings.TrimSpace(readProc(t, filepath.Join(cg, limFile))); got != want {
		t.Errorf("%s = %s, want %s (guest RAM plus overhead)", limFile, got, want)
	}
	// QEMU, virtiofsd and virtiofsd's sandboxed child.
	var names []string
	for _, p := range strings.Fields(readProc(t, filepath.Join(cg, "cgroup.procs"))) {
		comm, err := os.ReadFile("/proc/" + p + "/comm")
		if err == nil {
			names = append(names, strings.TrimSpace(string(comm)))
		}
	}
	if got := strings.Join(names, ","); !strings.Contains(got, "qemu-system") || strings.Count(got, "virtiofsd") < 1 {
		t.Errorf("processes in the VM cgroup: %s, want QEMU and virtiofsd", got)
	}
	// QEMU holds no descriptor of a path in the state directory: its sockets were passed in.
	fds, _ := filepath.Glob("/proc/" + pid + "/fd/*")
	for _, fd := range fds {
		if target, err := os.Readlink(fd); err == nil && strings.HasPrefix(target, m.StateDir()) {
			t.Errorf("QEMU opened %s", target)
		}
	}

	if err := sb.Stop(context.Background()); err != nil {
		t.Fatalf("stop: %v", err)
	}
	if err := m.Wait(context.Background()); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(cg); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("VM cgroup %s left after stop: %v", cg, err)
	}
	if pids := sharedFSProcesses("source=" + exported); len(pids) > 0 {
		t.Errorf("leftover virtiofsd processes %v", pids)
	}
}

func readProc(t *testing.T, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(fmt.Errorf("read %s: %w", p, err))
	}
	return string(b)
}
