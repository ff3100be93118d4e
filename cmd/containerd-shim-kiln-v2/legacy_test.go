package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"os"
	"testing"

	bootapi "github.com/containerd/containerd/api/runtime/bootstrap/v1"
	runcoptions "github.com/containerd/containerd/api/types/runc/options"
	runtimeoptions "github.com/containerd/containerd/api/types/runtimeoptions/v1"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/protobuf/proto"
	"github.com/containerd/typeurl/v2"

	"github.com/kiln-runtime/kiln/runtime/task"
)

// The arguments containerd 2.2 and 2.4 both pass to `start`.
var startArgs = []string{"-namespace", "k8s.io", "-address", "/run/containerd/containerd.sock",
	"-publish-binary", "/usr/bin/containerd", "-id", "task1", "-debug", "start"}

type fakeStarter struct {
	ctx    context.Context
	params *bootapi.BootstrapParams
	err    error
	calls  int
}

func (f *fakeStarter) Start(ctx context.Context, p *bootapi.BootstrapParams) (*bootapi.BootstrapResult, error) {
	f.ctx, f.params = ctx, p
	f.calls++
	if f.err != nil {
		return nil, f.err
	}
	return &bootapi.BootstrapResult{Version: 3, Address: "unix:///run/containerd/s/abc", Protocol: "ttrpc"}, nil
}

func TestParseShimArgs(t *testing.T) {
	a, ok := parseShimArgs(startArgs)
	if !ok || a.action != "start" || a.id != "task1" || a.namespace != "k8s.io" || !a.debug ||
		a.address != "/run/containerd/containerd.sock" {
		t.Errorf("parseShimArgs(start) = %+v, %v", a, ok)
	}
	if a, ok := parseShimArgs([]string{"-namespace", "n", "-id", "x", "-bundle", "/b", "delete"}); !ok || a.action != "delete" || a.bundle != "/b" {
		t.Errorf("parseShimArgs(delete) = %+v, %v", a, ok)
	}
	if _, ok := parseShimArgs([]string{"-no-such-flag", "start"}); ok {
		t.Error("an unknown flag parsed")
	}
}

func TestIsBootstrap(t *testing.T) {
	params := &bootapi.BootstrapParams{InstanceID: "task1", Namespace: "k8s.io", ContainerdVersion: "2.4.2"}
	if err := params.AddExtension(&runcoptions.Options{BinaryName: "x"}); err != nil {
		t.Fatal(err)
	}
	msg, err := proto.Marshal(params)
	if err != nil {
		t.Fatal(err)
	}
	if !isBootstrap(msg, "task1", "k8s.io") {
		t.Error("containerd 2.4's bootstrap message not recognised")
	}
	if isBootstrap(msg, "task2", "k8s.io") || isBootstrap(msg, "task1", "default") {
		t.Error("a bootstrap message for another task accepted")
	}
	// containerd 2.2 writes the runtime options, or nothing.
	opts, err := typeurl.MarshalAny(&runcoptions.Options{BinaryName: "task1"})
	if err != nil {
		t.Fatal(err)
	}
	legacy, err := proto.Marshal(typeurl.MarshalProto(opts))
	if err != nil {
		t.Fatal(err)
	}
	if isBootstrap(legacy, "task1", "k8s.io") || isBootstrap(nil, "task1", "k8s.io") {
		t.Error("containerd 2.2's start input taken for a bootstrap message")
	}
}

func TestLegacyStart(t *testing.T) {
	a, _ := parseShimArgs(startArgs)
	f := &fakeStarter{}
	var out bytes.Buffer
	// containerd 2.2 writes the runtime options on stdin; they reach Start as the bootstrap protocol's extension.
	opts, err := typeurl.MarshalAny(&runtimeoptions.Options{ConfigPath: "/etc/kiln/other.toml"})
	if err != nil {
		t.Fatal(err)
	}
	input, err := proto.Marshal(typeurl.MarshalProto(opts))
	if err != nil {
		t.Fatal(err)
	}
	if err := legacyStart(context.Background(), f, a, "/run/containerd/containerd.sock.ttrpc", input, &out); err != nil {
		t.Fatal(err)
	}
	if exts := f.params.GetExtensions(); len(exts) != 1 {
		t.Errorf("Start got %d extensions, want the runtime options", len(exts))
	} else if path, err := task.ConfigPath(exts[0].GetValue()); err != nil || path != "/etc/kiln/other.toml" {
		t.Errorf("the runtime options reached Start as %v: config path %q, %v", exts[0], path, err)
	}
	if ns, _ := namespaces.Namespace(f.ctx); ns != "k8s.io" {
		t.Errorf("Start got namespace %q in its context", ns)
	}
	p := f.params
	if p.GetInstanceID() != "task1" || p.GetNamespace() != "k8s.io" || p.GetLogLevel() != bootapi.LogLevel_LOG_LEVEL_DEBUG ||
		p.GetContainerdGrpcAddress() != "/run/containerd/containerd.sock" ||
		p.GetContainerdTtrpcAddress() != "/run/containerd/containerd.sock.ttrpc" {
		t.Errorf("Start params %v", p)
	}
	// containerd 2.2 decodes this JSON; a version below 2 would make it take the output for a bare address.
	var got struct {
		Version  int    `json:"version"`
		Address  string `json:"address"`
		Protocol string `json:"protocol"`
	}
	if err := json.Unmarshal(out.Bytes(), &got); err != nil || got.Version != 3 || got.Protocol != "ttrpc" ||
		got.Address != "unix:///run/containerd/s/abc" {
		t.Errorf("start output %q: %+v, %v", out.String(), got, err)
	}

	f.err = errors.New("boom")
	if err := legacyStart(context.Background(), f, a, "", nil, io.Discard); err == nil {
		t.Error("a failed start reported success")
	}
}

// startLegacy serves a start without a bootstrap message, and hands a start with one to pkg/shim with stdin
// intact.
func TestStartLegacyChoosesProtocol(t *testing.T) {
	params, err := proto.Marshal(&bootapi.BootstrapParams{InstanceID: "task1", Namespace: "k8s.io"})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name    string
		args    []string
		stdin   []byte
		handled bool
	}{
		{"old containerd", startArgs, nil, true},
		{"new containerd", startArgs, params, false},
		{"delete", []string{"-namespace", "k8s.io", "-id", "task1", "delete"}, nil, false},
		{"info", []string{"-info"}, []byte("options"), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			setStdin(t, tc.stdin)
			f := &fakeStarter{}
			handled, err := startLegacy(context.Background(), f, tc.args, io.Discard)
			if err != nil || handled != tc.handled || (f.calls == 1) != tc.handled {
				t.Fatalf("handled %v (want %v), %d starts, %v", handled, tc.handled, f.calls, err)
			}
			if !handled {
				rest, err := io.ReadAll(os.Stdin)
				if err != nil || !bytes.Equal(rest, tc.stdin) {
					t.Errorf("stdin left for pkg/shim: %q, %v; want %q", rest, err, tc.stdin)
				}
			}
		})
	}
}

func setStdin(t *testing.T, data []byte) {
	t.Helper()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		_, _ = w.Write(data)
		w.Close()
	}()
	old := os.Stdin
	os.Stdin = r
	t.Cleanup(func() {
		os.Stdin = old
		r.Close()
	})
}
