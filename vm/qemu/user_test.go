package qemu

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/kiln-runtime/kiln/vm/accel"
)

func TestReachable(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to chown")
	}
	nobody := &syscall.Credential{Uid: 65534, Gid: 65534}
	root, err := os.MkdirTemp("", "kiln-reach-") // 0700, in the world-searchable /tmp
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(root) })
	open := filepath.Join(root, "open")
	if err := os.Mkdir(open, 0o755); err != nil {
		t.Fatal(err)
	}
	write := func(p string, mode os.FileMode) string {
		if err := os.WriteFile(p, []byte("x"), mode); err != nil {
			t.Fatal(err)
		}
		return p
	}
	public := write(filepath.Join(open, "public"), 0o644)
	private := write(filepath.Join(open, "private"), 0o600)
	group := write(filepath.Join(open, "group"), 0o640)
	if err := os.Chown(group, 0, 4242); err != nil {
		t.Fatal(err)
	}

	if err := reachable(public, nobody, mayRead); err == nil || !strings.Contains(err.Error(), "cannot search "+root) {
		t.Errorf("file below a 0700 directory: %v", err)
	}
	if err := os.Chmod(root, 0o711); err != nil {
		t.Fatal(err)
	}
	if err := reachable(public, nobody, mayRead); err != nil {
		t.Errorf("public file: %v", err)
	}
	if err := reachable(private, nobody, mayRead); err == nil || !strings.Contains(err.Error(), "cannot read") {
		t.Errorf("0600 root file: %v", err)
	}
	if err := reachable(group, nobody, mayRead); err == nil {
		t.Error("0640 file of another group is readable")
	}
	if err := reachable(group, &syscall.Credential{Uid: 65534, Gid: 65534, Groups: []uint32{4242}}, mayRead); err != nil {
		t.Errorf("0640 file of a supplementary group: %v", err)
	}
	if err := reachable(public, nobody, mayRead|mayWrite); err == nil {
		t.Error("0644 root file is writable")
	}

	c := Config{Kernel: public, Initrd: private, Accel: accel.TCG}
	err = checkReachable(c, nobody)
	if err == nil || !strings.Contains(err.Error(), "guest initrd") || !strings.Contains(err.Error(), "hypervisor.user") {
		t.Errorf("checkReachable: %v", err)
	}
	if err := checkReachable(c, nil); err != nil {
		t.Errorf("QEMU as Kiln's user is not checked: %v", err)
	}
}

func TestQEMUCredentialIsACopy(t *testing.T) {
	u := &syscall.Credential{Uid: 7, Gid: 8, Groups: []uint32{9}}
	got := qemuCredential(Config{User: u, Accel: accel.TCG})
	if got == u || got.Uid != 7 || got.Gid != 8 || len(got.Groups) != 1 {
		t.Fatalf("%+v", got)
	}
	if qemuCredential(Config{}) != nil {
		t.Error("no User, yet a credential")
	}
}
