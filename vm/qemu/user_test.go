package qemu

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/kiln-runtime/kiln/config"
	"github.com/kiln-runtime/kiln/vm/accel"
	"github.com/kiln-runtime/kiln/vm/idlease"
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

// hypervisor.user = "per-vm": each start of QEMU runs it as an id of the range no other holds, given back once QEMU
// was reaped, whether the start succeeded or not.
func TestEachQEMUHasAUserOfItsOwn(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to start QEMU as another user")
	}
	// The kernel, initrd and stand-in QEMU must be reachable by the leased users; the stand-in notes who it ran
	// as and exits, so each Start fails waiting for QMP.
	dir, err := os.MkdirTemp("", "kiln-peruser-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o777); err != nil {
		t.Fatal(err)
	}
	ran := filepath.Join(dir, "ran-as")
	stand := filepath.Join(dir, "qemu")
	if err := os.WriteFile(stand, []byte("#!/bin/sh\nid -u >> "+ran+"\nid -g >> "+ran+"\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	cfg, _ := startableConfig(t)
	for _, f := range []*string{&cfg.Hypervisor.Kernel, &cfg.Hypervisor.Initrd} {
		moved := filepath.Join(dir, filepath.Base(*f))
		if err := os.WriteFile(moved, nil, 0o644); err != nil {
			t.Fatal(err)
		}
		*f = moved
	}
	cfg.Hypervisor.User, cfg.Hypervisor.UserRange = config.QEMUUserPerVM, "1879000000:3"
	mc := quietConfig(t, cfg)
	if mc.User != nil || mc.Users == nil || mc.Users.First != 1879000000 || mc.Users.Count != 3 || mc.Users.Dir != idlease.Dir {
		t.Fatalf("ConfigFrom: User %v Users %+v", mc.User, mc.Users)
	}
	mc.Users.Dir = filepath.Join(dir, "leases")
	mc.QEMU, mc.TSCkHz = stand, 1
	// The stand-in writes where a confined QEMU may not.
	mc.Confine = false
	// Another VM holds the range's first id.
	held, err := mc.Users.Take()
	if err != nil {
		t.Fatal(err)
	}
	defer held.Release()
	for i := 0; i < 2; i++ {
		startFailing(t, mc)
	}
	b, err := os.ReadFile(ran)
	if err != nil {
		t.Fatalf("the stand-in never ran: %v", err)
	}
	// Both starts took the same id: the first gave it back.
	if got, want := string(b), strings.Repeat("1879000001\n", 4); got != want {
		t.Errorf("QEMU ran as %q, want %q", got, want)
	}
	if left, _ := os.ReadDir(mc.Users.Dir); len(left) != 1 || left[0].Name() != "1879000000" {
		t.Errorf("leases left: %v", left)
	}
}
