package task

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/shim"

	"github.com/kiln-runtime/kiln/runtime/pod"
)

func TestRecordRoundTrip(t *testing.T) {
	dir := t.TempDir()
	if _, err := ReadRecord(dir); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("no record: %v, want ErrNotExist", err)
	}
	want := Record{VMID: "kiln-1", StateDir: "/run/kiln", ShareDir: "/run/kiln/kiln-1.share", ShimPid: 42, Pid: 7}
	if err := WriteRecord(dir, want); err != nil {
		t.Fatal(err)
	}
	got, err := ReadRecord(dir)
	if err != nil || got != want {
		t.Fatalf("read %+v, %v; want %+v", got, err, want)
	}
	if err := RemoveRecord(dir); err != nil {
		t.Fatal(err)
	}
	if err := RemoveRecord(dir); err != nil {
		t.Fatalf("second remove: %v", err)
	}
}

// Validate accepts exactly the records a shim writes and names the first field that is not as written.
func TestRecordValidate(t *testing.T) {
	ctx := namespaces.WithNamespace(context.Background(), "k8s.io")
	const socketDir = "/run/containerd-2/s" // containerd's socket_dir
	sock, err := shim.CreateSocketAddress(ctx, socketDir, "/run/containerd/containerd.sock", "pod-1", false)
	if err != nil {
		t.Fatal(err)
	}
	id := VMID("k8s.io", "pod-1")
	valid := Record{VMID: id, StateDir: "/run/kiln", ShareDir: pod.ShareDir("/run/kiln", id), ShimPid: 42, ShimSocket: sock, Pid: 7}
	if err := valid.Validate(socketDir); err != nil {
		t.Fatalf("record as a shim writes it: %v", err)
	}
	// From a containerd that names no socket dir, the shim's socket is in containerd's default one.
	defaultSock, err := shim.SocketAddress(ctx, "/run/containerd/containerd.sock", "pod-1", false)
	if err != nil {
		t.Fatal(err)
	}
	inDefault := valid
	inDefault.ShimSocket = defaultSock
	if err := inDefault.Validate(SocketDir(t.TempDir())); err != nil {
		t.Errorf("record of a shim in containerd's default socket dir: %v", err)
	}
	// Nor from a shim that ran before containerd named one (or a Kiln that did not read it).
	if err := inDefault.Validate(socketDir); err != nil {
		t.Errorf("record of a shim in containerd's default socket dir, containerd naming another: %v", err)
	}
	// A spare shim's pod has a random id of VMID's form: `delete` must act on the record of the task it was handed.
	spareID := vmID([]byte{0xde, 0xad, 0xbe, 0xef, 0, 1, 2, 3})
	spare := valid
	spare.VMID, spare.ShareDir = spareID, pod.ShareDir("/run/kiln", spareID)
	if err := spare.Validate(socketDir); err != nil {
		t.Errorf("record of a task handed to a spare shim: %v", err)
	}
	noSocket := valid
	noSocket.ShimSocket = ""
	if err := noSocket.Validate(socketDir); err != nil {
		t.Errorf("record without a socket: %v", err)
	}
	for _, tc := range []struct {
		field string
		edit  func(r *Record)
	}{
		{"vm_id", func(r *Record) { r.VMID = "" }},
		{"vm_id", func(r *Record) { r.VMID = "kiln-1" }},
		{"vm_id", func(r *Record) { r.VMID = "../etc" }},
		{"vm_id", func(r *Record) { r.VMID = strings.ToUpper(id) }},
		{"vm_id", func(r *Record) { r.VMID = id + "/x" }},
		{"state_dir", func(r *Record) { r.StateDir = "" }},
		{"state_dir", func(r *Record) { r.StateDir = "run/kiln" }},
		{"state_dir", func(r *Record) { r.StateDir = "/run/kiln/" }},
		{"state_dir", func(r *Record) { r.StateDir = "/run/kiln/../../etc" }},
		{"share_dir", func(r *Record) { r.ShareDir = "" }},
		{"share_dir", func(r *Record) { r.ShareDir = "/" }},
		{"share_dir", func(r *Record) { r.ShareDir = "/run/kiln/" + id + ".share/" }},
		{"share_dir", func(r *Record) { r.ShareDir = "/run/kiln/other.share" }},
		{"shim_socket", func(r *Record) { r.ShimSocket = strings.TrimPrefix(sock, "unix://") }},
		{"shim_socket", func(r *Record) { r.ShimSocket = "unix:///etc/passwd" }},
		{"shim_socket", func(r *Record) { r.ShimSocket = "unix://" + socketDir + "/../../../etc/passwd" }},
		{"shim_socket", func(r *Record) { r.ShimSocket = sock + "/x" }},
		{"shim_socket", func(r *Record) { r.ShimSocket = "unix://" + socketDir + "/abc" }},
		{"shim_socket", func(r *Record) { r.ShimSocket = "unix://" + socketDir + "/../s/" + strings.Repeat("0", 64) }},
		{"shim_pid", func(r *Record) { r.ShimPid = -1 }},
	} {
		r := valid
		tc.edit(&r)
		err := r.Validate(socketDir)
		if err == nil || !strings.HasPrefix(err.Error(), tc.field+" ") {
			t.Errorf("Validate(%+v) = %v, want an error naming %s", r, err, tc.field)
		}
	}
}

// SocketDir is the socket directory containerd's shim package linked in the bundle, or containerd's default.
func TestSocketDir(t *testing.T) {
	for _, tc := range []struct {
		name, link, want string
	}{
		{"containerd named one", "/run/c2/s", "/run/c2/s"},
		{"unclean", "/run/c2//s/", "/run/c2/s"},
		{"relative", "c2/s", "/run/containerd/s"},
		{"none", "", "/run/containerd/s"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			bundle := t.TempDir()
			if tc.link != "" {
				if err := os.Symlink(tc.link, filepath.Join(bundle, "s")); err != nil {
					t.Fatal(err)
				}
			}
			if got := SocketDir(bundle); got != tc.want {
				t.Errorf("SocketDir with link %q = %q, want %q", tc.link, got, tc.want)
			}
		})
	}
}
