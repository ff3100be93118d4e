package share

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/kiln-runtime/kiln/mounttree"
)

// A recursive bind of a host directory above a share (a hostPath of / or /run, where Kiln's state lies) leaves
// the share out, with every container's mounts in it: each such bind copied every pod's share, the copies made
// before it too, so that their count grew with each until mounts failed host-wide. A share itself cannot be
// bound; the error says why.
func TestRecursiveBindLeavesSharesOut(t *testing.T) {
	requireRoot(t)
	base, _ := sharedHostTree(t)
	other, err := New(filepath.Join(base, "other"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = other.Close() })
	rootfs, _, _ := hostTree(t)
	ctx := context.Background()
	if _, err := other.AddRootfs(ctx, "c1", rootfs, false); err != nil {
		t.Fatal(err)
	}
	s := newTestShare(t)
	guest, err := s.AddBindSource(ctx, "c1", Source{Path: base}, BindOptions{Recursive: true})
	if err != nil {
		t.Fatal(err)
	}
	host := filepath.Join(s.mounts, strings.TrimPrefix(guest, GuestDir+"/"))
	mps, err := mounttree.Points(host)
	if err != nil {
		t.Fatal(err)
	}
	for _, mp := range mps {
		if mounttree.Under(mp, filepath.Join(host, "other")) {
			t.Errorf("the bind of the directory holding a share copied the share's mount %s", mp)
		}
	}
	if !slices.Contains(mps, filepath.Join(host, "sub")) {
		t.Errorf("the bind's mounts %v leave out the host's submount sub", mps)
	}
	_, err = s.AddBindSource(ctx, "c2", Source{Path: other.Dir()}, BindOptions{})
	if err == nil || !strings.Contains(err.Error(), "unbindable") {
		t.Errorf("bind of another share: %v, want an error saying it is unbindable", err)
	}
}

// Nothing a share mounts reaches a mount namespace that is a slave of the host's (a systemd service's): only the
// share's own bind does, the one mount a mount under a shared directory cannot help spreading, and it goes with
// the share's directory.
func TestShareStaysOutOfOtherMountNamespaces(t *testing.T) {
	requireRoot(t)
	base, _ := sharedHostTree(t)
	sleeper := exec.Command("unshare", "--mount", "--propagation", "slave", "sleep", "60")
	if err := sleeper.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = sleeper.Process.Kill()
		_ = sleeper.Wait()
	})
	ns := fmt.Sprintf("/proc/%d/ns/mnt", sleeper.Process.Pid)
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		theirs, err1 := os.Readlink(ns)
		ours, err2 := os.Readlink("/proc/self/ns/mnt")
		if err1 == nil && err2 == nil && theirs != ours {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("unshare's mount namespace: %v %v", err1, err2)
		}
	}
	theirMounts := func(under string) []string {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/mountinfo", sleeper.Process.Pid))
		if err != nil {
			t.Fatal(err)
		}
		var mps []string
		for _, l := range strings.Split(string(b), "\n") {
			if f := strings.Fields(l); len(f) > 4 && mounttree.Under(f[4], under) {
				mps = append(mps, f[4])
			}
		}
		return mps
	}
	s, err := New(filepath.Join(base, "share"))
	if err != nil {
		t.Fatal(err)
	}
	rootfs, _, _ := hostTree(t)
	if _, err := s.AddRootfs(context.Background(), "c1", rootfs, false); err != nil {
		t.Fatal(err)
	}
	if got := theirMounts(s.Dir()); len(got) > 1 || len(got) == 1 && got[0] != s.Dir() {
		t.Errorf("the other mount namespace has the share's mounts %v, want its own bind at most", got)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if got := theirMounts(s.Dir()); len(got) > 0 {
		t.Errorf("the other mount namespace keeps %v after the share closed", got)
	}
}
