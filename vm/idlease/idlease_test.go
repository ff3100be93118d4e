package idlease

import (
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// fakeProc is a /proc of processes whose directories are owned by the given uids and gids.
func fakeProc(t *testing.T, owners ...[2]int) string {
	t.Helper()
	proc := t.TempDir()
	for i, o := range owners {
		dir := filepath.Join(proc, strconv.Itoa(i+1))
		if err := os.Mkdir(dir, 0o555); err != nil {
			t.Fatal(err)
		}
		if err := os.Lchown(dir, o[0], o[1]); err != nil {
			t.Fatal(err)
		}
	}
	// Not a process: passed over.
	if err := os.Mkdir(filepath.Join(proc, "self-ish"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Lchown(filepath.Join(proc, "self-ish"), 7000, 7000); err != nil {
		t.Fatal(err)
	}
	return proc
}

func take(t *testing.T, r Range) *Lease {
	t.Helper()
	l, err := r.Take()
	if err != nil {
		t.Fatal(err)
	}
	return l
}

func TestTakeLeasesEachIDOnce(t *testing.T) {
	r := Range{First: 5000, Count: 3, Dir: filepath.Join(t.TempDir(), "ids"), Proc: fakeProc(t)}
	a, b := take(t, r), take(t, r)
	if a.ID != 5000 || b.ID != 5001 {
		t.Fatalf("leased %d and %d, want 5000 and 5001", a.ID, b.ID)
	}
	if err := a.Release(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(r.Dir, "5000")); !os.IsNotExist(err) {
		t.Errorf("a released lease's lock file is still there (%v)", err)
	}
	c := take(t, r)
	if c.ID != 5000 {
		t.Errorf("after 5000's release the lease is %d", c.ID)
	}
	d := take(t, r)
	if d.ID != 5002 {
		t.Errorf("third lease %d, want 5002", d.ID)
	}
	_, err := r.Take()
	if err == nil || !strings.Contains(err.Error(), "all 3 ids from 5000 are taken") || !strings.Contains(err.Error(), "hypervisor.user_range") {
		t.Errorf("a full range: %v", err)
	}
	for _, l := range []*Lease{b, c, d} {
		if err := l.Release(); err != nil {
			t.Error(err)
		}
	}
	if err := d.Release(); err != nil {
		t.Errorf("a second release: %v", err)
	}
	if left, _ := os.ReadDir(r.Dir); len(left) != 0 {
		t.Errorf("lock files left: %v", left)
	}
}

func TestTakePassesOverIDsProcessesRunWith(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to give a fake process's directory to another user")
	}
	for _, tc := range []struct {
		name  string
		owner [2]int
		want  uint32
	}{
		{"uid", [2]int{7000, 1}, 7001},
		{"gid", [2]int{0, 7000}, 7001},
		{"below the range", [2]int{6999, 6999}, 7000},
		{"root", [2]int{0, 0}, 7000},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := Range{First: 7000, Count: 4, Dir: t.TempDir(), Proc: fakeProc(t, tc.owner)}
			l := take(t, r)
			defer l.Release()
			if l.ID != tc.want {
				t.Errorf("leased %d, want %d", l.ID, tc.want)
			}
		})
	}
}

// A real process running as the range's first id (a QEMU outliving its killed shim, or a user of the range
// outside Kiln) keeps that id from a lease.
func TestTakePassesOverALiveProcess(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to start a process as another user")
	}
	const first = 1879048190 // below Kiln's default range, where no one else runs
	cmd := exec.Command("sleep", "60")
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: first, Gid: 0}}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
	deadline := time.Now().Add(5 * time.Second)
	for {
		b, _ := os.ReadFile("/proc/" + strconv.Itoa(cmd.Process.Pid) + "/status")
		if strings.Contains(string(b), "Uid:\t1879048190") || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	l := take(t, Range{First: first, Count: 2, Dir: t.TempDir()})
	defer l.Release()
	if l.ID != first+1 {
		t.Errorf("leased %d while a process runs as %d", l.ID, first)
	}
}

// A lock file removed by its holder between another's open and lock is not a lease: the other opens again.
func TestTryLockOpensAgainAfterARemoval(t *testing.T) {
	p := filepath.Join(t.TempDir(), "9")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := os.Remove(p); err != nil {
		t.Fatal(err)
	}
	same, err := sameFile(f, p)
	if err != nil || same {
		t.Fatalf("a removed file is the one at its path: %v %v", same, err)
	}
	l, err := tryLock(p)
	if err != nil || l == nil {
		t.Fatalf("tryLock: %v %v", l, err)
	}
	defer l.Release()
	if same, err := sameFile(l.f, p); err != nil || !same {
		t.Errorf("the lease's file is not the one at its path: %v %v", same, err)
	}
	if again, err := tryLock(p); err != nil || again != nil {
		t.Errorf("a held lock was taken again: %v %v", again, err)
	}
}

// Leases taken and released at once from many places never give one id to two holders.
func TestOneHolderAtATime(t *testing.T) {
	r := Range{First: 100, Count: 1, Dir: t.TempDir(), Proc: fakeProc(t)}
	var holders, most, leased atomic.Int32
	var wg sync.WaitGroup
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 300; i++ {
				l, err := r.Take()
				if err != nil {
					continue // held elsewhere
				}
				leased.Add(1)
				n := holders.Add(1)
				for m := most.Load(); n > m && !most.CompareAndSwap(m, n); m = most.Load() {
				}
				runtime.Gosched()
				holders.Add(-1)
				if err := l.Release(); err != nil {
					t.Error(err)
				}
			}
		}()
	}
	wg.Wait()
	if most.Load() != 1 || leased.Load() == 0 {
		t.Errorf("%d leases, at most %d holders at once", leased.Load(), most.Load())
	}
}

func TestClaimed(t *testing.T) {
	etc := t.TempDir()
	files := map[string]string{
		"passwd": "root:x:0:0:root:/root:/bin/sh\nvm:x:1000005:1000005::/:/bin/false\nbelow:x:999999:1::/:/bin/false\nbroken:x:zz:1\n",
		"group":  "root:x:0:\nedge:x:1000009:\nafter:x:1000010:\n",
		"subuid": "# comment\nalice:100000:65536\nkubelet:900000:100001\n",
		"subgid": "bob:1000010:5\nempty:1000000:0\n",
	}
	for name, content := range files {
		if err := os.WriteFile(filepath.Join(etc, name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	got, err := Range{First: 1000000, Count: 10}.Claimed(etc)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{
		etc + "/passwd vm (1000005)",
		etc + "/group edge (1000009)",
		etc + "/subuid kubelet (900000:100001)",
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("claimed:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	if got, err := (Range{First: 1000000, Count: 10}).Claimed(t.TempDir()); err != nil || len(got) != 0 {
		t.Errorf("no account files: %v %v", got, err)
	}
}

func TestKubeletUnbounded(t *testing.T) {
	for _, tc := range []struct {
		name    string
		kubelet bool
		subuid  string
		want    bool
	}{
		{"no kubelet", false, "", false},
		{"kubelet without a subuid file", true, "-", true},
		{"kubelet without its entry", true, "alice:100000:65536\n", true},
		{"kubelet with its entry", true, "alice:100000:65536\nkubelet:65536000:65536000\n", false},
		{"an entry named like it", true, "kubelet2:1:1\n", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			etc, kubelet := t.TempDir(), filepath.Join(t.TempDir(), "kubelet")
			if tc.kubelet {
				if err := os.Mkdir(kubelet, 0o700); err != nil {
					t.Fatal(err)
				}
			}
			if tc.subuid != "-" {
				if err := os.WriteFile(filepath.Join(etc, "subuid"), []byte(tc.subuid), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			if got, err := KubeletUnbounded(etc, kubelet); err != nil || got != tc.want {
				t.Errorf("KubeletUnbounded = %v, %v; want %v", got, err, tc.want)
			}
		})
	}
}
