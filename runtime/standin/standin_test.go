package standin

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (chroot, network namespaces)")
	}
}

func nsIno(t *testing.T, path string) uint64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

// A stand-in's /proc entry leads into the container's root file system and the pod's network namespace (a new
// one when there is none to join, never the host's), and once closed it holds neither: the root's mount can
// be unmounted at once, without MNT_DETACH. Its thread lives on, back in the shim's root and namespace, for
// the next stand-in.
func TestStandIn(t *testing.T) {
	requireRoot(t)
	root := t.TempDir()
	if err := unix.Mount("tmpfs", root, "tmpfs", 0, "size=1m"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = unix.Unmount(root, unix.MNT_DETACH) })
	if err := os.WriteFile(filepath.Join(root, "marker"), []byte("the container's"), 0o644); err != nil {
		t.Fatal(err)
	}

	pool, err := NewPool()
	if err != nil {
		t.Fatal(err)
	}
	own, err := pool.Start(root, nil)
	if err != nil {
		t.Fatal(err)
	}
	proc := fmt.Sprintf("/proc/%d", own.Pid())
	if got, err := os.ReadFile(filepath.Join(proc, "root", "marker")); err != nil || string(got) != "the container's" {
		t.Errorf("%s/root/marker: %q, %v", proc, got, err)
	}
	if cwd, err := os.Readlink(filepath.Join(proc, "cwd")); err != nil || cwd != root {
		t.Errorf("%s/cwd: %q, %v; want the root, %s", proc, cwd, err, root)
	}
	if _, err := os.Stat("/proc/self/root/marker"); err == nil {
		t.Error("the shim's own root changed")
	}
	podNS := filepath.Join(proc, "ns", "net")
	if nsIno(t, podNS) == nsIno(t, "/proc/self/ns/net") {
		t.Error("a stand-in with no namespace to join is in the host's network namespace")
	}

	ns, err := own.NetNS()
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	joined, err := pool.Start(root, ns)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := nsIno(t, fmt.Sprintf("/proc/%d/ns/net", joined.Pid())), nsIno(t, podNS); got != want {
		t.Errorf("joined network namespace %d, want the pod's %d", got, want)
	}
	for _, s := range []*Thread{joined, own, own} {
		if err := s.Close(); err != nil {
			t.Error(err)
		}
	}
	if _, err := os.Stat(filepath.Join(proc, "root", "marker")); err == nil {
		t.Errorf("%s still leads into the root after Close", proc)
	}
	if err := unix.Unmount(root, 0); err != nil {
		t.Errorf("unmount the root after Close: %v", err)
	}

	if _, err := pool.Start(filepath.Join(root, "missing"), nil); err == nil {
		t.Error("a stand-in started in a missing root")
	}
	notNS, err := os.Open(root)
	if err != nil {
		t.Fatal(err)
	}
	defer notNS.Close()
	if _, err := pool.Start(root, notNS); err == nil {
		t.Error("a stand-in joined a directory as its network namespace")
	}

	// A closed stand-in's thread is back in the shim's root and network namespace, alive, and serves the next.
	for _, f := range []string{"root", "ns/net"} {
		if got, want := nsIno(t, filepath.Join(proc, f)), nsIno(t, filepath.Join("/proc/self", f)); got != want {
			t.Errorf("%s/%s after Close: %d, want the shim's %d", proc, f, got, want)
		}
	}
	next, err := pool.Start(t.TempDir(), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer next.Close()
	if pid := fmt.Sprint(next.Pid()); pid != strings.TrimPrefix(proc, "/proc/") && pid != fmt.Sprint(joined.Pid()) {
		t.Errorf("the next stand-in %s took a new thread, not one of %s and %d", pid, proc, joined.Pid())
	}
}
