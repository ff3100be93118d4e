package integration

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kiln-runtime/kiln/config"
	"github.com/kiln-runtime/kiln/integration/testbundle"
	"github.com/kiln-runtime/kiln/vm/accel"
	"github.com/kiln-runtime/kiln/vm/confine"
	"github.com/kiln-runtime/kiln/vm/idlease"
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

// With hypervisor.user = "per-vm" two VMs' QEMUs run as two users of the range: a process running as one of them
// (as a QEMU a guest took over would) cannot read the other's descriptors, among them its guest RAM's memfd,
// though it reads its own. After Stop both ids are given back.
func TestEachVMsQEMURunsAsAUserOfItsOwn(t *testing.T) {
	share := requireVM(t)
	if os.Geteuid() != 0 {
		t.Skip("needs root to switch QEMU's user")
	}
	users := &idlease.Range{First: 1879048192 - 16, Count: 16, Dir: t.TempDir()}
	var pids, uids []string
	var stops []func()
	for i := 0; i < 2; i++ {
		m := testMachine(t, filepath.Join(share, "vmlinuz"), filepath.Join(share, "initrd.img"), func(c *qemu.Config) {
			c.ID += strconv.Itoa(i)
			c.Users = users
		})
		sb := startSandbox(t, m, 60*time.Second)
		pid := strconv.Itoa(m.PID())
		status := readProc(t, "/proc/"+pid+"/status")
		var uid string
		for _, line := range strings.Split(status, "\n") {
			if rest, ok := strings.CutPrefix(line, "Uid:"); ok {
				uid = strings.Fields(rest)[0]
			}
		}
		if !strings.Contains(status, fmt.Sprintf("Uid:\t%s\t%s\t%s\t%s\n", uid, uid, uid, uid)) || !strings.Contains(status, fmt.Sprintf("Gid:\t%s\t%s\t%s\t%s\n", uid, uid, uid, uid)) {
			t.Fatalf("QEMU %s's ids:\n%s", pid, status)
		}
		pids, uids = append(pids, pid), append(uids, uid)
		stops = append(stops, func() {
			if err := sb.Stop(context.Background()); err != nil {
				t.Errorf("stop: %v", err)
			}
			if err := m.Wait(context.Background()); err != nil {
				t.Error(err)
			}
		})
	}
	if uids[0] == uids[1] || uids[0] != strconv.Itoa(int(users.First)) || uids[1] != strconv.Itoa(int(users.First)+1) {
		t.Errorf("the QEMUs run as %v, want the range's first two ids", uids)
	}
	as := func(uid string, args ...string) error {
		id, _ := strconv.Atoi(uid)
		cmd := exec.Command(args[0], args[1:]...)
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(id), Gid: uint32(id)}}
		out, err := cmd.CombinedOutput()
		if err != nil {
			return fmt.Errorf("%v: %s", err, out)
		}
		return nil
	}
	if err := as(uids[0], "ls", "/proc/"+pids[0]+"/fd"); err != nil {
		t.Errorf("QEMU's own user cannot list its descriptors: %v", err)
	}
	if err := as(uids[0], "ls", "/proc/"+pids[1]+"/fd"); err == nil {
		t.Errorf("the first QEMU's user lists the other QEMU's descriptors")
	}
	for _, stop := range stops {
		stop()
	}
	if left, err := os.ReadDir(users.Dir); err != nil || len(left) != 0 {
		t.Errorf("leases left after stop: %v %v", left, err)
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

// hypervisor.confine: QEMU starts in a Landlock domain with a socket filter, so that a QEMU a guest took over (here a script in
// QEMU's place, which runs as QEMU's user and in its domain before it executes the real one) writes no file in
// the directories every user may write (where the next VM of its uid would find it), and connects to no TCP
// listener of the host (the filter). Without it the same script writes and connects, and the VM boots
// confined as it does unconfined.
func TestQEMUIsConfined(t *testing.T) {
	share := requireVM(t)
	if os.Geteuid() != 0 {
		t.Skip("needs root to switch QEMU's user and create cgroups")
	}
	abi := confine.ABI()
	if abi == 0 {
		t.Skip("the host kernel has no Landlock")
	}
	real, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	port := l.Addr().(*net.TCPAddr).Port
	script := fmt.Sprintf(`#!/bin/bash
for d in /tmp /var/tmp /dev/shm; do
	if touch "$d/kiln-landlock-probe-$$" 2>/dev/null; then rm -f "$d/kiln-landlock-probe-$$"; echo "probe $d wrote"; else echo "probe $d denied"; fi
done
if (exec 3<>/dev/tcp/127.0.0.1/%d) 2>/dev/null; then echo "probe tcp connected"; else echo "probe tcp denied"; fi
exec %s "$@"
`, port, real)
	wrapper := filepath.Join(testbundle.PublicDir(t), "qemu-system-x86_64")
	if err := os.WriteFile(wrapper, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	for _, confined := range []bool{true, false} {
		name := "unconfined"
		if confined {
			name = "confined"
		}
		t.Run(name, func(t *testing.T) {
			m := testMachine(t, filepath.Join(share, "vmlinuz"), filepath.Join(share, "initrd.img"), func(c *qemu.Config) {
				c.QEMU = wrapper
				c.User = &syscall.Credential{Uid: 65534, Gid: 65534}
				c.Cgroup = true
				c.Confine = confined
			})
			sb := startSandbox(t, m, 60*time.Second)
			if _, err := sb.GuestInfo(context.Background()); err != nil {
				t.Fatalf("guest info: %v", err)
			}
			console := readProc(t, m.ConsolePath())
			want := []string{"probe /tmp wrote", "probe /var/tmp wrote", "probe /dev/shm wrote", "probe tcp connected"}
			if confined {
				want = []string{"probe /tmp denied", "probe /var/tmp denied", "probe /dev/shm denied", "probe tcp denied"}
			}
			for _, w := range want {
				if !strings.Contains(console, w+"\n") {
					t.Errorf("the console lacks %q (Landlock ABI %d):\n%s", w, abi, firstLines(console, 8))
				}
			}
		})
	}
}

// firstLines is the first n lines of s.
func firstLines(s string, n int) string {
	lines := strings.SplitAfterN(s, "\n", n+1)
	return strings.Join(lines[:min(n, len(lines))], "")
}
