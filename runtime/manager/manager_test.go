package manager

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/shim"
	"github.com/containerd/errdefs"
	"github.com/containerd/typeurl/v2"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	specfeatures "github.com/opencontainers/runtime-spec/specs-go/features"

	"github.com/kiln-runtime/kiln/runtime/bundle"
	"github.com/kiln-runtime/kiln/runtime/hooks"
	"github.com/kiln-runtime/kiln/runtime/hostcgroup"
	"github.com/kiln-runtime/kiln/runtime/pod"
	"github.com/kiln-runtime/kiln/runtime/task"
)

func TestGroup(t *testing.T) {
	for _, tc := range []struct {
		name        string
		annotations map[string]string
		want        string
	}{
		{"standalone container", nil, "ctr-1"},
		{"pod container", map[string]string{bundle.SandboxAnnotation: "pod-9"}, "pod-9"},
		{"empty sandbox id", map[string]string{bundle.SandboxAnnotation: ""}, "ctr-1"},
	} {
		if got := Group("ctr-1", tc.annotations); got != tc.want {
			t.Errorf("%s: group %q, want %q", tc.name, got, tc.want)
		}
	}
}

func TestBundleAnnotations(t *testing.T) {
	dir := t.TempDir()
	spec := `{"ociVersion":"1.2.0","annotations":{"io.kubernetes.cri.sandbox-id":"pod-1"}}`
	if err := os.WriteFile(filepath.Join(dir, "config.json"), []byte(spec), 0o644); err != nil {
		t.Fatal(err)
	}
	a, err := bundle.Annotations(dir)
	if err != nil || Group("c", a) != "pod-1" {
		t.Fatalf("annotations %v, %v", a, err)
	}
}

func TestCleanupRemovesWhatADeadShimLeft(t *testing.T) {
	state := t.TempDir()
	id := task.VMID("default", "dead")
	ctx := namespaces.WithNamespace(context.Background(), "default")
	// The socket directory containerd named (its socket_dir); the socket is a file here, Cleanup removes either.
	socketDir := t.TempDir()
	sock, err := shim.CreateSocketAddress(ctx, socketDir, "/run/containerd/containerd.sock", "dead", false)
	if err != nil {
		t.Fatal(err)
	}
	rec := task.Record{VMID: id, StateDir: state, ShareDir: pod.ShareDir(state, id), ShimPid: 0, ShimSocket: sock}
	vmDir := filepath.Join(state, rec.VMID)
	for _, d := range []string{vmDir, rec.ShareDir} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	sockPath := strings.TrimPrefix(sock, "unix://")
	if err := os.WriteFile(sockPath, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	// A process still naming the VM's state directory stands for a QEMU that outlived its shim.
	orphan := startStandIn(t, "sh", vmDir+"/qmp.sock")
	done := make(chan struct{})
	go func() { _ = orphan.Wait(); close(done) }()
	if err := Cleanup(context.Background(), rec, socketDir); err != nil {
		t.Fatal(err)
	}
	// Cleanup returns once the process is dead (a zombie counts); reaping it here may take a moment more.
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Error("process naming the VM state survived cleanup")
	}
	for _, d := range []string{vmDir, rec.ShareDir, sockPath} {
		if _, err := os.Stat(d); !os.IsNotExist(err) {
			t.Errorf("%s still exists (%v)", d, err)
		}
	}
}

// TestCleanupEndsWithItsContext: a VM's host cgroup that does not empty (here a process that is no VM's holds
// it) held Cleanup 3 s past its kill wait, beyond what containerd gives the delete command; it gives up when its
// context ends, and still removes the rest.
func TestCleanupEndsWithItsContext(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to create cgroups")
	}
	holder := exec.Command("sleep", "60")
	if err := holder.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = holder.Process.Kill(); _ = holder.Wait() })
	cg := fmt.Sprintf("/kiln-manager-test-%d", os.Getpid())
	g, err := hostcgroup.Enter(cg, holder.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := g.Leave(); err != nil {
			t.Error(err)
		}
	})
	state := t.TempDir()
	id := task.VMID("default", "slow")
	rec := task.Record{VMID: id, StateDir: state, ShareDir: pod.ShareDir(state, id), Cgroup: cg}
	for _, d := range []string{filepath.Join(state, id), rec.ShareDir} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	start := time.Now()
	if err := Cleanup(ctx, rec, "/run/containerd/s"); err != nil {
		t.Fatal(err)
	}
	if took := time.Since(start); took > 2*time.Second {
		t.Errorf("Cleanup took %v with a context of 500ms, want it to end with the context", took)
	}
	for _, d := range []string{filepath.Join(state, id), rec.ShareDir} {
		if _, err := os.Stat(d); !os.IsNotExist(err) {
			t.Errorf("%s still exists (%v)", d, err)
		}
	}
}

func TestCleanupLeavesALiveShimAlone(t *testing.T) {
	state := t.TempDir()
	// A process whose command line names the shim binary stands for the group's running shim.
	shim := startStandIn(t, "containerd-shim-kiln-v2")
	defer func() { _ = shim.Process.Kill(); _ = shim.Wait() }()
	id := task.VMID("default", "live")
	rec := task.Record{VMID: id, StateDir: state, ShareDir: pod.ShareDir(state, id), ShimPid: shim.Process.Pid}
	if err := os.MkdirAll(filepath.Join(state, rec.VMID), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := Cleanup(context.Background(), rec, "/run/containerd/s"); !errdefs.IsFailedPrecondition(err) {
		t.Fatalf("cleanup with a live shim: %v, want FailedPrecondition", err)
	}
	if _, err := os.Stat(filepath.Join(state, rec.VMID)); err != nil {
		t.Errorf("live shim's VM state removed: %v", err)
	}
}

// A task record is the bundle's to hold and anyone who can write the bundle can edit it: `delete` acts only on a
// record naming what a shim writes there, and otherwise refuses with InvalidArgument, naming the field, before
// killing or removing anything (issue 11, finding 12).
func TestCleanupRefusesARecordNamingOtherPaths(t *testing.T) {
	id := task.VMID("default", "c1")
	for _, tc := range []struct {
		name  string
		field string
		// edit turns a valid record for a VM in base/state into a hostile one and returns the directory the
		// old cleanup would have killed processes for and removed things in ("" for none).
		edit func(r *task.Record, base string) (victim string)
	}{
		{"vm_id climbing out of the state dir", "vm_id", func(r *task.Record, base string) string {
			r.VMID = "../victim"
			r.ShareDir = pod.ShareDir(r.StateDir, r.VMID)
			return filepath.Join(base, "victim")
		}},
		{"vm_id of another form", "vm_id", func(r *task.Record, base string) string {
			r.StateDir, r.VMID = base, "victim"
			r.ShareDir = pod.ShareDir(r.StateDir, r.VMID)
			return filepath.Join(base, "victim")
		}},
		{"state_dir not clean", "state_dir", func(r *task.Record, base string) string {
			r.StateDir = base + "/state/.."
			r.ShareDir = pod.ShareDir(r.StateDir, r.VMID)
			return filepath.Join(base, id)
		}},
		{"state_dir relative", "state_dir", func(r *task.Record, base string) string {
			r.StateDir = "kiln-no-such-relative-dir"
			r.ShareDir = pod.ShareDir(r.StateDir, r.VMID)
			return ""
		}},
		{"share_dir elsewhere", "share_dir", func(r *task.Record, base string) string {
			r.ShareDir = filepath.Join(base, "victim")
			return r.ShareDir
		}},
		{"share_dir missing", "share_dir", func(r *task.Record, base string) string {
			r.ShareDir = ""
			return ""
		}},
		{"shim_socket outside containerd's socket dir", "shim_socket", func(r *task.Record, base string) string {
			r.ShimSocket = "unix://" + filepath.Join(base, "victim", "file")
			return filepath.Join(base, "victim")
		}},
		{"shim_socket climbing out of containerd's socket dir", "shim_socket", func(r *task.Record, base string) string {
			r.ShimSocket = "unix:///run/containerd/s/../../.." + filepath.Join(base, "victim", "file")
			return filepath.Join(base, "victim")
		}},
		{"shim_socket without unix://", "shim_socket", func(r *task.Record, base string) string {
			r.ShimSocket = "/run/containerd/s/" + strings.Repeat("0", 64)
			return ""
		}},
		{"shim_socket in another socket dir", "shim_socket", func(r *task.Record, base string) string {
			r.ShimSocket = "unix://" + filepath.Join(base, "t") + "/" + strings.Repeat("0", 64)
			return ""
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			base := t.TempDir()
			state := filepath.Join(base, "state")
			rec := task.Record{VMID: id, StateDir: state, ShareDir: pod.ShareDir(state, id)}
			victim := tc.edit(&rec, base)
			var exited chan struct{}
			if victim != "" {
				if err := os.MkdirAll(victim, 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(filepath.Join(victim, "file"), []byte("keep"), 0o644); err != nil {
					t.Fatal(err)
				}
				// A process naming the victim stands for one the old cleanup would take for the VM's.
				bystander := startStandIn(t, "sh", victim+"/x")
				exited = make(chan struct{})
				go func() { _ = bystander.Wait(); close(exited) }()
				defer func() { _ = bystander.Process.Kill(); <-exited }()
			}

			// containerd named a socket dir of its own (socket_dir), as the harness's containerd does.
			err := Cleanup(context.Background(), rec, filepath.Join(base, "s"))
			if !errdefs.IsInvalidArgument(err) || !strings.Contains(fmt.Sprint(err), tc.field) {
				t.Errorf("cleanup of %+v: %v, want InvalidArgument naming %s", rec, err, tc.field)
			}
			if victim == "" {
				return
			}
			if b, err := os.ReadFile(filepath.Join(victim, "file")); err != nil || string(b) != "keep" {
				t.Errorf("cleanup removed %s: %q %v", victim, b, err)
			}
			select {
			case <-exited:
				t.Errorf("cleanup killed a process naming %s", victim)
			case <-time.After(200 * time.Millisecond):
			}
		})
	}
}

// containerd's CRI reads the handler's features from Info: recursive read-only mounts are offered, and user
// namespaces, which CRI offers only with idmapped mounts (Kiln idmaps roots on the host).
func TestInfoReportsFeatures(t *testing.T) {
	info, err := New("v-test").Info(context.Background(), strings.NewReader(""))
	if err != nil {
		t.Fatal(err)
	}
	v, err := typeurl.UnmarshalAny(info.Features)
	if err != nil {
		t.Fatal(err)
	}
	f, ok := v.(*specfeatures.Features)
	if !ok {
		t.Fatalf("features of type %T", v)
	}
	if !slices.Contains(f.MountOptions, "rro") || slices.Contains(f.Hooks, "createContainer") || !slices.Contains(f.Hooks, "createRuntime") {
		t.Errorf("features %+v", f)
	}
	if f.Linux == nil || f.Linux.MountExtensions == nil || !*f.Linux.MountExtensions.IDMap.Enabled || !slices.Contains(f.Linux.Namespaces, "user") {
		t.Errorf("user namespaces with idmapped mounts not offered: %+v", f.Linux)
	}
}

// startStandIn starts a shell loop whose command line carries args, standing for a process Cleanup looks for, and
// returns once the command line shows them: Start returns once the child is forked, and until it has exec'd its
// command line is this test binary's, which Cleanup would pass over.
func startStandIn(t *testing.T, args ...string) *exec.Cmd {
	t.Helper()
	cmd := exec.Command("sh", append([]string{"-c", "while :; do sleep 0.1; done"}, args...)...)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	want := args[len(args)-1]
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", cmd.Process.Pid))
		if strings.Contains(string(b), want) {
			return cmd
		}
		if time.Now().After(deadline) {
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
			t.Fatalf("the stand-in's command line is %q, want it to name %q", b, want)
		}
	}
}

// The `delete` after a shim died runs the container's poststop hooks before its cleanup, and once: a later
// `delete`, after a cleanup that failed, does not run them again.
func TestStopRunsPoststopOnce(t *testing.T) {
	dir, _ := hookedBundle(t, func(hook string) specs.Hooks {
		return specs.Hooks{Poststop: []specs.Hook{{Path: hook, Args: []string{"hook", "ran"}}}}
	})
	// A record whose cleanup fails (it names no VM of Kiln's form), as one that outlived a failed `delete`.
	if err := task.WriteRecord(dir, task.Record{VMID: "not-a-vm", StateDir: t.TempDir()}); err != nil {
		t.Fatal(err)
	}
	t.Chdir(dir)
	ctx := namespaces.WithNamespace(context.Background(), "default")
	for i := 0; i < 2; i++ {
		if _, err := New("test").Stop(ctx, "c1"); err == nil {
			t.Fatalf("delete %d: the cleanup of a record naming no VM succeeded", i)
		}
		if got, _ := os.ReadFile(filepath.Join(dir, "runs")); string(got) != "ran\n" {
			t.Errorf("after delete %d the poststop hook ran %q, want once", i, got)
		}
	}
}

// A shim that died after its container's create hooks ran and before it recorded the task (its VM still
// booting) leaves them owed: the `delete` containerd runs then runs the poststop hooks (nerdctl's CNI DEL, which
// releases the address the ADD leased), and only once. Without create hooks run, it runs none.
func TestStopRunsOwedPoststopWithoutARecord(t *testing.T) {
	for _, owed := range []bool{true, false} {
		dir, spec := hookedBundle(t, func(hook string) specs.Hooks {
			return specs.Hooks{CreateRuntime: []specs.Hook{{Path: hook, Args: []string{"hook", "ADD"}}},
				Poststop: []specs.Hook{{Path: hook, Args: []string{"hook", "DEL"}}}}
		})
		ctx := namespaces.WithNamespace(context.Background(), "default")
		want := ""
		if owed {
			if err := hooks.CreateRuntime(ctx, spec, hooks.State{ID: "c1", Bundle: dir}); err != nil {
				t.Fatal(err)
			}
			want = "ADD\nDEL\n"
		}
		t.Chdir(dir)
		for i := 0; i < 2; i++ {
			if _, err := New("test").Stop(ctx, "c1"); err != nil {
				t.Fatalf("delete %d without a record: %v", i, err)
			}
			if got, _ := os.ReadFile(filepath.Join(dir, "runs")); string(got) != want {
				t.Errorf("create hooks run %v: after delete %d the hooks ran %q, want %q", owed, i, got, want)
			}
		}
	}
}

// A shim that runs on after containerd gave up on its create (a create cancelled while the VM booted) keeps its
// owed poststop hooks: the `delete` containerd runs meanwhile leaves them to it, so the address a CNI ADD leased
// is not released under a VM about to use it.
func TestStopLeavesOwedPoststopToALiveShim(t *testing.T) {
	dir, spec := hookedBundle(t, func(hook string) specs.Hooks {
		return specs.Hooks{CreateRuntime: []specs.Hook{{Path: hook, Args: []string{"hook", "ADD"}}},
			Poststop: []specs.Hook{{Path: hook, Args: []string{"hook", "DEL"}}}}
	})
	ctx := namespaces.WithNamespace(context.Background(), "default")
	if err := hooks.CreateRuntime(ctx, spec, hooks.State{ID: "c1", Bundle: dir}); err != nil {
		t.Fatal(err)
	}
	// A process that reads as a Kiln shim, as the one that ran the create hooks.
	sleep, err := os.ReadFile("/bin/sleep")
	if err != nil {
		t.Fatal(err)
	}
	shimPath := filepath.Join(t.TempDir(), "containerd-shim-kiln-v2")
	if err := os.WriteFile(shimPath, sleep, 0o755); err != nil {
		t.Fatal(err)
	}
	shim := exec.Command(shimPath, "60")
	if err := shim.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = shim.Process.Kill(); _ = shim.Wait() })
	if err := os.WriteFile(filepath.Join(dir, "kiln-poststop-owed"), []byte(strconv.Itoa(shim.Process.Pid)), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Chdir(dir)
	// Its command line reads empty for a moment after its exec (the kernel sets it up after the exec returned to
	// its parent): a shim that ran create hooks is long past that.
	for deadline := time.Now().Add(5 * time.Second); !isShim(shim.Process.Pid); time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the stand-in shim never read as one")
		}
	}
	if _, err := New("test").Stop(ctx, "c1"); err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(filepath.Join(dir, "runs")); string(got) != "ADD\n" {
		t.Errorf("with the shim alive the hooks ran %q, want the ADD alone", got)
	}
	_ = shim.Process.Kill()
	_ = shim.Wait()
	if _, err := New("test").Stop(ctx, "c1"); err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(filepath.Join(dir, "runs")); string(got) != "ADD\nDEL\n" {
		t.Errorf("once the shim is gone the hooks ran %q, want the DEL too", got)
	}
}

// hookedBundle makes a bundle whose spec has the hooks hooksOf gives for a hook script that appends its first
// argument to the bundle's file "runs".
func hookedBundle(t *testing.T, hooksOf func(hook string) specs.Hooks) (string, *specs.Spec) {
	t.Helper()
	dir := t.TempDir()
	if err := os.Mkdir(filepath.Join(dir, "rootfs"), 0o755); err != nil {
		t.Fatal(err)
	}
	hook := filepath.Join(dir, "hook")
	if err := os.WriteFile(hook, []byte("#!/bin/sh\necho $1 >> "+dir+"/runs\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	h := hooksOf(hook)
	spec := &specs.Spec{Process: &specs.Process{Args: []string{"true"}}, Root: &specs.Root{Path: "rootfs"}, Hooks: &h}
	b, err := json.Marshal(spec)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "config.json"), b, 0o644); err != nil {
		t.Fatal(err)
	}
	return dir, spec
}
