package task

import (
	"context"
	"errors"
	"os"
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
	sock, err := shim.SocketAddress(ctx, "/run/containerd/containerd.sock", "pod-1", false)
	if err != nil {
		t.Fatal(err)
	}
	id := VMID("k8s.io", "pod-1")
	valid := Record{VMID: id, StateDir: "/run/kiln", ShareDir: pod.ShareDir("/run/kiln", id), ShimPid: 42, ShimSocket: sock, Pid: 7}
	if err := valid.Validate(); err != nil {
		t.Fatalf("record as a shim writes it: %v", err)
	}
	// A spare shim's pod has a random id of VMID's form: `delete` must act on the record of the task it was handed.
	spareID := vmID([]byte{0xde, 0xad, 0xbe, 0xef, 0, 1, 2, 3})
	spare := valid
	spare.VMID, spare.ShareDir = spareID, pod.ShareDir("/run/kiln", spareID)
	if err := spare.Validate(); err != nil {
		t.Errorf("record of a task handed to a spare shim: %v", err)
	}
	noSocket := valid
	noSocket.ShimSocket = ""
	if err := noSocket.Validate(); err != nil {
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
		{"shim_socket", func(r *Record) { r.ShimSocket = "unix:///run/containerd/s/../../../etc/passwd" }},
		{"shim_socket", func(r *Record) { r.ShimSocket = sock + "/x" }},
		{"shim_socket", func(r *Record) { r.ShimSocket = "unix:///run/containerd/s/abc" }},
		{"shim_pid", func(r *Record) { r.ShimPid = -1 }},
	} {
		r := valid
		tc.edit(&r)
		err := r.Validate()
		if err == nil || !strings.HasPrefix(err.Error(), tc.field+" ") {
			t.Errorf("Validate(%+v) = %v, want an error naming %s", r, err, tc.field)
		}
	}
}
