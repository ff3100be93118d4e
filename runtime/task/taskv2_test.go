package task

import (
	"context"
	"net"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	taskv2 "github.com/containerd/containerd/api/runtime/task/v2"
	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/ttrpc"
	"google.golang.org/protobuf/reflect/protoreflect"
)

// Version 2 of the task API is served by version 3's handlers, which holds only while every method of version
// 2 is in the table and its messages match version 3's field for field.
func TestTaskV2MatchesV3(t *testing.T) {
	v2 := taskv2.File_runtime_task_v2_shim_proto.Services().ByName("Task")
	v3 := taskAPI.File_runtime_task_v3_shim_proto.Services().ByName("Task")
	if string(v2.FullName()) != taskV2Name {
		t.Fatalf("version 2's service is %s, Kiln registers %s", v2.FullName(), taskV2Name)
	}
	desc := taskV2Desc(&Service{})
	if len(desc.Methods) != v2.Methods().Len() {
		t.Errorf("%d methods served as version 2, the API has %d", len(desc.Methods), v2.Methods().Len())
	}
	for i := 0; i < v2.Methods().Len(); i++ {
		m2 := v2.Methods().Get(i)
		if _, ok := desc.Methods[string(m2.Name())]; !ok {
			t.Errorf("version 2 method %s is not served", m2.Name())
			continue
		}
		m3 := v3.Methods().ByName(m2.Name())
		if m3 == nil {
			t.Errorf("version 2 method %s has no version 3 counterpart", m2.Name())
			continue
		}
		for _, pair := range [][2]protoreflect.MessageDescriptor{{m2.Input(), m3.Input()}, {m2.Output(), m3.Output()}} {
			if a, b := messageShape(pair[0]), messageShape(pair[1]); a != b {
				t.Errorf("%s: version 2 message %s is %s, version 3's %s is %s", m2.Name(), pair[0].FullName(), a, pair[1].FullName(), b)
			}
		}
	}
}

// messageShape describes a message's fields by number, name, kind and cardinality, and a nested message's by
// its name without the package, which is what differs between the versions.
func messageShape(m protoreflect.MessageDescriptor) string {
	var b strings.Builder
	fields := m.Fields()
	for i := 0; i < fields.Len(); i++ {
		f := fields.Get(i)
		b.WriteString(string(f.Name()) + "=" + f.Kind().String() + "/" + f.Cardinality().String())
		b.WriteString("#" + strconv.Itoa(int(f.Number())))
		if f.Message() != nil {
			b.WriteString(":" + string(f.Message().FullName().Name()))
		}
		b.WriteString(" ")
	}
	return b.String()
}

// A not-implemented answer reaches a version 2 caller (containerd, after its downgrade) with Kiln's reason.
func TestTaskV2CarriesKilnsAnswer(t *testing.T) {
	l, err := net.Listen("unix", filepath.Join(t.TempDir(), "s"))
	if err != nil {
		t.Fatal(err)
	}
	srv, err := ttrpc.NewServer()
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	if err := (&Service{}).RegisterTTRPC(srv); err != nil {
		t.Fatal(err)
	}
	go func() { _ = srv.Serve(context.Background(), l) }()
	conn, err := net.Dial("unix", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	client := ttrpc.NewClient(conn)
	defer client.Close()
	_, err = taskv2.NewTTRPCTaskClient(client).Create(context.Background(), &taskv2.CreateTaskRequest{ID: "c", Checkpoint: "/checkpoint"})
	err = errgrpc.ToNative(err)
	if !errdefs.IsNotImplemented(err) || !strings.Contains(err.Error(), "checkpoint") {
		t.Errorf("version 2 Create from a checkpoint: %v, want Kiln's not-implemented answer naming the checkpoint", err)
	}
}
