package containerd

import (
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// TestKilnTmpfsVolumeDoesNotKillVM: a container fills a host tmpfs bound into it (a Kubernetes emptyDir of
// medium Memory is one) with 450 MB. virtiofsd writes those pages, so the host charges them to the VM's cgroup,
// whose limit was the guest's 256 MiB and QEMU's overhead: the OOM killer ended the VM (exit 137) after about
// 220 MB. The pod's VM cgroup now holds the tmpfs volumes its containers write beside the VM's own memory, as
// runc charges them to the container, within the pod's limits.
func TestKilnTmpfsVolumeDoesNotKillVM(t *testing.T) {
	k := startKiln(t)
	vol := filepath.Join(t.TempDir(), "mem")
	if err := unix.Mkdir(vol, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("tmpfs", vol, "tmpfs", 0, "size=1g"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = unix.Unmount(vol, unix.MNT_DETACH) })
	out, errOut, code := k.run(t, "--rm", "--mount", "type=bind,src="+vol+",dst=/data,options=rbind:rw", BusyboxRef, "kiln-tmpfs-volume",
		"sh", "-c", "dd if=/dev/zero of=/data/f bs=1M count=450 2>&1 && echo written")
	if code != 0 || !strings.Contains(out, "written") {
		t.Fatalf("filling a 1 GiB host tmpfs volume with 450 MB: exit %d, stdout %q, stderr %s", code, out, errOut)
	}
	var st unix.Statfs_t
	if err := unix.Statfs(vol, &st); err != nil {
		t.Fatal(err)
	}
	if used := int64(st.Blocks-st.Bfree) * st.Bsize; used < 450<<20 {
		t.Errorf("the host tmpfs holds %d bytes, want the 450 MB written", used)
	}
	if log := k.logSince(t, 0); !strings.Contains(log, "now also holds the host tmpfs volumes") {
		t.Error("the shim log does not say the VM's cgroup took in the tmpfs volume")
	}
}
