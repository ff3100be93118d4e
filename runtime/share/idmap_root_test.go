package share

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/kiln-runtime/kiln/mounttree"
)

// The uidmap= and gidmap= options containerd's snapshotters put on the root of a container with a user
// namespace give an idmapped root in the share: what root owns on disk, the mapped root owns in the export.
func TestAddRootfsMountsIDMapped(t *testing.T) {
	requireRoot(t)
	requireUserNamespaces(t)
	idmap := []string{"uidmap=0:1000:100000", "gidmap=0:2000:100000"}
	cases := []struct {
		name   string
		mounts func(t *testing.T, base string) []Mount
	}{
		{"bind", func(t *testing.T, base string) []Mount {
			dir := filepath.Join(base, "fs")
			mkdirs(t, dir)
			write(t, filepath.Join(dir, "layer"), "x")
			return []Mount{{Type: "bind", Source: dir, Options: append([]string{"rbind", "rw"}, idmap...)}}
		}},
		{"overlay", func(t *testing.T, base string) []Mount {
			l1, l2, upper, work := filepath.Join(base, "l1"), filepath.Join(base, "l2"), filepath.Join(base, "upper"), filepath.Join(base, "work")
			mkdirs(t, l1, l2, upper, work)
			write(t, filepath.Join(l1, "layer"), "x")
			write(t, filepath.Join(l2, "other"), "y")
			// The snapshotter gives the upper directory to the mapped root.
			if err := os.Chown(upper, 1000, 2000); err != nil {
				t.Fatal(err)
			}
			return []Mount{{Type: "overlay", Source: "overlay", Options: append([]string{
				"index=off", "lowerdir=" + l1 + ":" + l2, "upperdir=" + upper, "workdir=" + work,
			}, idmap...)}}
		}},
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			s := newTestShare(t)
			id := "m" + string(rune('0'+i))
			rel, err := s.AddRootfsMounts(context.Background(), id, tc.mounts(t, t.TempDir()), false)
			if err != nil {
				t.Fatal(err)
			}
			exported := filepath.Join(s.ExportDir(), rel)
			// The container's mapped root, which is no one in particular on the guest, must be able to reach its root.
			for _, d := range []string{s.ExportDir(), filepath.Dir(exported)} {
				if fi, err := os.Stat(d); err != nil || fi.Mode().Perm()&0o001 == 0 {
					t.Errorf("%s cannot be passed through by others: %v %v", d, fi.Mode(), err)
				}
			}
			if uid, gid := owner(t, filepath.Join(exported, "layer")); uid != 1000 || gid != 2000 {
				t.Errorf("a root-owned file shows as %d:%d in the export, want 1000:2000", uid, gid)
			}
			if err := s.RemoveContainer(context.Background(), id); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// An idmapped mount needs both mappings; one alone is refused and leaves nothing.
func TestAddRootfsMountsRefusesHalfAnIDMap(t *testing.T) {
	requireRoot(t)
	s := newTestShare(t)
	dir := t.TempDir()
	_, err := s.AddRootfsMounts(context.Background(), "h", []Mount{{Type: "bind", Source: dir, Options: []string{"rbind", "uidmap=0:1000:10"}}}, false)
	if err == nil {
		t.Fatal("uidmap without gidmap accepted")
	}
	if mps, _ := mounttree.Points(filepath.Join(s.mounts, "h")); len(mps) > 0 {
		t.Errorf("refused rootfs left mounts %v", mps)
	}
	assertForgotten(t, s, "h")
}

// assertForgotten fails the test when the share still holds a record or a directory of container id, whose
// root did not go in: one was left for each failed create until the pod ended.
func assertForgotten(t *testing.T, s *Share, id string) {
	t.Helper()
	s.mu.Lock()
	_, held := s.containers[id]
	s.mu.Unlock()
	if _, err := os.Lstat(filepath.Join(s.mounts, id)); held || !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a failed root left the share holding container %s (record %t, directory: %v)", id, held, err)
	}
}

// A root the share refuses after it made the container's record (a source inside the share) leaves nothing.
func TestRefusedRootfsLeavesNoContainer(t *testing.T) {
	requireRoot(t)
	s := newTestShare(t)
	inside := filepath.Join(s.mounts, "x")
	mkdirs(t, inside)
	if _, err := s.AddRootfs(context.Background(), "r", inside, false); err == nil {
		t.Fatal("a root inside the share accepted")
	}
	assertForgotten(t, s, "r")
}

func mkdirs(t *testing.T, dirs ...string) {
	t.Helper()
	for _, d := range dirs {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
}

func owner(t *testing.T, path string) (uid, gid uint32) {
	t.Helper()
	fi, err := os.Lstat(path)
	if err != nil {
		t.Fatal(err)
	}
	st := fi.Sys().(*syscall.Stat_t)
	return st.Uid, st.Gid
}

// requireUserNamespaces skips where the host refuses new user namespaces, which idmapped mounts are made with:
// the kernel refuses them to a chrooted process (as in a fresh-check root), or when user.max_user_namespaces is 0.
func requireUserNamespaces(t *testing.T) {
	cmd := exec.Command("/bin/true")
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWUSER}
	if err := cmd.Run(); err != nil {
		t.Skipf("this host refuses new user namespaces (%v), which idmapped roots need", err)
	}
}

// A bind mount with uidMappings and gidMappings (CRI gives a pod with a user namespace its /etc/hosts,
// /etc/hostname and /etc/resolv.conf so) is idmapped in the export, which the guest binds as it is; mappings
// on a mount that is not a bind, or on one side only, are refused.
func TestShareSpecMountsIDMapped(t *testing.T) {
	requireRoot(t)
	requireUserNamespaces(t)
	uids := []specs.LinuxIDMapping{{ContainerID: 0, HostID: 1000, Size: 100000}}
	gids := []specs.LinuxIDMapping{{ContainerID: 0, HostID: 2000, Size: 100000}}
	dir := t.TempDir()
	file := filepath.Join(dir, "hosts")
	write(t, file, "127.0.0.1 localhost")
	cases := []struct {
		name    string
		mount   specs.Mount
		wantErr string
	}{
		{"file", specs.Mount{Destination: "/etc/hosts", Type: "bind", Source: file, Options: []string{"rbind", "rprivate", "rw"}, UIDMappings: uids, GIDMappings: gids}, ""},
		{"directory, ridmap", specs.Mount{Destination: "/d", Type: "bind", Source: dir, Options: []string{"rbind", "ridmap"}, UIDMappings: uids, GIDMappings: gids}, ""},
		{"uid mappings alone", specs.Mount{Destination: "/d", Type: "bind", Source: dir, Options: []string{"rbind"}, UIDMappings: uids}, "both uid and gid mappings"},
		{"a tmpfs", specs.Mount{Destination: "/t", Type: "tmpfs", Source: "tmpfs", UIDMappings: uids, GIDMappings: gids}, "only bind mounts can be idmapped"},
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			s := newTestShare(t)
			id := "v" + string(rune('0'+i))
			if _, err := s.AddRootfs(context.Background(), id, t.TempDir(), false); err != nil {
				t.Fatal(err)
			}
			spec := &specs.Spec{Mounts: []specs.Mount{tc.mount}}
			err := s.ShareSpecMounts(context.Background(), id, t.TempDir(), spec, nil)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("error %v, want one saying %q", err, tc.wantErr)
				}
				if mps, _ := mounttree.Points(filepath.Join(s.mounts, podBinds)); len(mps) > 0 {
					t.Errorf("refused mount left mounts %v", mps)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			m := spec.Mounts[0]
			if len(m.UIDMappings) > 0 || len(m.GIDMappings) > 0 || slices.Contains(m.Options, "ridmap") {
				t.Errorf("the guest's mount still asks for an idmap: %+v", m)
			}
			exported := filepath.Join(s.ExportDir(), strings.TrimPrefix(m.Source, GuestDir+"/"))
			if fi, err := os.Stat(exported); err == nil && fi.IsDir() {
				exported = filepath.Join(exported, "hosts")
			}
			if uid, gid := owner(t, exported); uid != 1000 || gid != 2000 {
				t.Errorf("a root-owned file shows as %d:%d in the export, want 1000:2000", uid, gid)
			}
			if uid, gid := owner(t, file); uid != 0 || gid != 0 {
				t.Errorf("the host's file changed owner to %d:%d", uid, gid)
			}
		})
	}
}
