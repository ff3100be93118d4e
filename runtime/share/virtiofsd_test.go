package share

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/kiln-runtime/kiln/vm/virtiofs"
)

// virtiofsd serves the share from a mount namespace of its own, entered when its client connects. Mounts made
// on the host after that must still reach it: this test looks into that namespace through
// /proc/<pid>/root, without a guest.
func TestVirtiofsdSeesLateMounts(t *testing.T) {
	requireRoot(t)
	if _, err := os.Stat(virtiofs.DefaultBinary); err != nil {
		t.Skipf("virtiofsd not installed: %v", err)
	}
	s := newTestShare(t)
	ctx := context.Background()
	rootfs, vol, _ := hostTree(t)
	if _, err := s.AddRootfs(ctx, "early", rootfs, true); err != nil {
		t.Fatal(err)
	}
	root := virtiofsdRoot(t, s, "early")

	if got := read(t, filepath.Join(root, "early/rootfs/etc/hostname")); got != "c1" {
		t.Errorf("virtiofsd sees %q in the early rootfs", got)
	}
	// Added after virtiofsd entered its namespace.
	guest, err := s.AddBind(ctx, "late", vol, true)
	if err != nil {
		t.Fatal(err)
	}
	lateFile := filepath.Join(root, strings.TrimPrefix(guest, GuestDir+"/"), "data")
	if got := read(t, lateFile); got != "volume data" {
		t.Errorf("virtiofsd sees %q in the late bind", got)
	}
	// And removed again: the namespace's copy goes too, so the guest cannot pin the host's files.
	if err := s.RemoveContainer(ctx, "late"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(lateFile); err == nil {
		t.Error("late bind still visible to virtiofsd after RemoveContainer")
	}
}

// A mount the host makes under a bind source after the source was shared reaches virtiofsd too (the share's
// copy of a bind is a slave of the host's mount, not a private copy), and the share's removal of the bind
// leaves the host's mounts alone.
func TestVirtiofsdSeesHostMountsUnderABindSource(t *testing.T) {
	requireRoot(t)
	if _, err := os.Stat(virtiofs.DefaultBinary); err != nil {
		t.Skipf("virtiofsd not installed: %v", err)
	}
	src, sub := sharedHostTree(t)
	s := newTestShare(t)
	ctx := context.Background()
	guest, err := s.AddBind(ctx, "c1", src, true)
	if err != nil {
		t.Fatal(err)
	}
	root := virtiofsdRoot(t, s, "c1")
	late := filepath.Join(src, "late")
	if err := os.Mkdir(late, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("tmpfs", late, "tmpfs", 0, "size=1m"); err != nil {
		t.Fatal(err)
	}
	write(t, filepath.Join(late, "f"), "mounted late")
	if got := read(t, filepath.Join(root, strings.TrimPrefix(guest, GuestDir+"/"), "late", "f")); got != "mounted late" {
		t.Errorf("virtiofsd sees %q under the bind", got)
	}
	if err := s.RemoveContainer(ctx, "c1"); err != nil {
		t.Fatal(err)
	}
	for _, mp := range []string{sub, late} {
		if !isMountPoint(t, mp) {
			t.Errorf("host mount %s gone after RemoveContainer", mp)
		}
	}
}

// virtiofsdRoot starts virtiofsd on the share's export, connects to it so that it sets up its sandbox, and
// returns the sandbox's view of the exported directory once entry, a name in it, is visible there.
func virtiofsdRoot(t *testing.T, s *Share, entry string) string {
	t.Helper()
	ctx := context.Background()
	log := logrus.New()
	log.SetOutput(io.Discard)
	d, err := virtiofs.Start(ctx, virtiofs.Config{
		SourceDir:  s.ExportDir(),
		SocketPath: filepath.Join(t.TempDir(), "fs.sock"),
		Log:        logrus.NewEntry(log),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Stop(ctx) })
	// A client connection makes virtiofsd set up its sandbox (a child in new mount and PID namespaces).
	c, err := net.Dial("unix", d.SocketPath())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	var req [12]byte
	binary.LittleEndian.PutUint32(req[0:], 1) // VHOST_USER_GET_FEATURES
	binary.LittleEndian.PutUint32(req[4:], 1)
	if _, err := c.Write(req[:]); err != nil {
		t.Fatal(err)
	}
	var reply [20]byte
	if _, err := io.ReadFull(c, reply[:]); err != nil {
		t.Fatal(err)
	}
	return sandboxRoot(t, d.PID(), entry)
}

// sandboxRoot is /proc/<pid>/root of virtiofsd's sandboxed child: its view of the exported directory.
func sandboxRoot(t *testing.T, pid int, entry string) string {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", pid, pid))
		if f := strings.Fields(string(b)); len(f) > 0 {
			root := "/proc/" + f[0] + "/root"
			if _, err := os.Stat(filepath.Join(root, entry)); err == nil {
				return root
			}
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatal("virtiofsd's sandboxed child did not appear")
	return ""
}
