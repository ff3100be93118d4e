package pod

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/sirupsen/logrus"

	"github.com/kiln-runtime/kiln/config"
	"github.com/kiln-runtime/kiln/runtime/bundle"
	"github.com/kiln-runtime/kiln/runtime/network"
)

func TestMain(m *testing.M) {
	// The test binary is its own namespace holder (network.StartHolder runs os.Executable).
	network.RunHolderIfAsked()
	os.Exit(m.Run())
}

// hookedPod is a pod without a VM whose first container, c, has a createRuntime hook that appends a line to the
// file it returns (and fails when fail is set), in a network namespace of its own.
func hookedPod(t *testing.T, id string, fail bool) (*Pod, *First, string) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to create network namespaces")
	}
	dir := t.TempDir()
	ran := filepath.Join(dir, "ran")
	script := "echo ran >> " + ran
	if fail {
		script += "; exit 7"
	}
	spec := &specs.Spec{
		Hooks: &specs.Hooks{CreateRuntime: []specs.Hook{{Path: "/bin/sh", Args: []string{"sh", "-c", script}}}},
		Linux: &specs.Linux{Namespaces: []specs.LinuxNamespace{{Type: specs.PIDNamespace}, {Type: specs.IPCNamespace}, {Type: specs.UTSNamespace}, {Type: specs.NetworkNamespace}}},
	}
	cfg := config.Default()
	cfg.Runtime.StateDir = filepath.Join(dir, "state")
	p := &Pod{id: id, cfg: cfg, log: logrus.NewEntry(logrus.New()), net: &hostNetwork{}}
	if err := os.MkdirAll(p.ShareDir(), 0o700); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = p.closeNetwork() })
	return p, &First{ID: "c", Bundle: &bundle.Bundle{Dir: dir, Spec: spec}}, ran
}

func hookRuns(t *testing.T, ran string) int {
	t.Helper()
	b, err := os.ReadFile(ran)
	if errors.Is(err, os.ErrNotExist) {
		return 0
	}
	if err != nil {
		t.Fatal(err)
	}
	return strings.Count(string(b), "ran\n")
}

// What a spare's pod prepared for its first container before it failed goes to the pod booted instead: the
// container's createRuntime hook runs once, and the namespace it configured is the one the second pod mirrors.
func TestTakenNetworkRunsHooksOnce(t *testing.T) {
	spare, first, ran := hookedPod(t, "spare", false)
	if _, err := spare.prepareNetwork(context.Background(), first); err != nil {
		t.Fatal(err)
	}
	if n := hookRuns(t, ran); n != 1 {
		t.Fatalf("hook ran %d times, want 1", n)
	}
	path := spare.net.path
	taken := spare.TakeNetwork()
	if taken == nil {
		t.Fatal("TakeNetwork = nil after the first container's hooks ran")
	}
	if spare.net.holder != nil || spare.net.mirror != nil {
		t.Error("the spare's pod still holds the network it handed over: its Close would undo it")
	}
	if _, _, err := taken.take("other"); err == nil {
		t.Error("a network prepared for c was taken for container other")
	}

	booted, _, _ := hookedPod(t, "booted", false)
	net, _, err := taken.take(first.ID)
	if err != nil {
		t.Fatal(err)
	}
	booted.net = net
	if _, _, err := taken.take(first.ID); err == nil {
		t.Error("the network was taken twice")
	}
	if err := taken.Close(); err != nil {
		t.Errorf("Close of a taken network: %v", err)
	}
	if _, err := booted.prepareNetwork(context.Background(), first); err != nil {
		t.Fatal(err)
	}
	if n := hookRuns(t, ran); n != 1 {
		t.Errorf("hook ran %d times after the handover, want 1", n)
	}
	if booted.net.path != path || booted.net.mirror == nil {
		t.Errorf("the booted pod mirrors %q (mirror %v), want the spare's %q", booted.net.path, booted.net.mirror != nil, path)
	}
	// The namespace is the holder's own, which dies with it: a record naming /proc/<its pid>/ns/net would send a
	// killed shim's cleanup into whatever process has that pid by then.
	if _, err := os.Stat(filepath.Join(booted.ShareDir(), MirrorFile)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the booted pod's share has a mirror record for a namespace its holder made: %v", err)
	}
}

// A failed hook is the container's own failure (ErrHook), which a pod booted for it would repeat; a pod whose
// first container had no hooks hands nothing over.
func TestFailedHookIsErrHook(t *testing.T) {
	p, first, ran := hookedPod(t, "spare", true)
	_, err := p.prepareNetwork(context.Background(), first)
	if !errors.Is(err, ErrHook) || !strings.Contains(err.Error(), "exit status 7") {
		t.Fatalf("prepareNetwork = %v, want ErrHook with the hook's exit status", err)
	}
	if n := hookRuns(t, ran); n != 1 {
		t.Errorf("hook ran %d times, want 1", n)
	}

	plain, first, _ := hookedPod(t, "plain", false)
	first.Bundle.Spec.Hooks = nil
	if _, err := plain.prepareNetwork(context.Background(), first); err != nil {
		t.Fatal(err)
	}
	if n := plain.TakeNetwork(); n != nil {
		t.Errorf("TakeNetwork = %+v for a container without hooks, want nil", n)
	}
	var none *Network
	if err := none.Close(); err != nil {
		t.Errorf("Close of no network: %v", err)
	}
}

// A later container's hooks, in a pod whose first container named no network namespace and had no hooks, get a
// holder in the namespace the pod's stand-ins share (the one a client finds at /proc/<task pid>/ns/net), not in a
// new one the VM never sees.
func TestLaterHooksJoinTheStandInsNamespace(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to create network namespaces")
	}
	standIns, err := network.StartHolder("") // a new namespace, as the first stand-in makes
	if err != nil {
		t.Fatal(err)
	}
	defer standIns.Close()
	own, err := os.Open(standIns.NSPath())
	if err != nil {
		t.Fatal(err)
	}
	p := &Pod{id: "p", cfg: config.Default(), log: logrus.NewEntry(logrus.New()), net: &hostNetwork{}}
	p.standIns.own = own
	t.Cleanup(func() {
		_ = p.closeNetwork()
		_ = own.Close()
	})
	if err := p.ensureHolder(); err != nil {
		t.Fatal(err)
	}
	got, err := os.Stat(p.net.holder.NSPath())
	if err != nil {
		t.Fatal(err)
	}
	want, err := own.Stat()
	if err != nil {
		t.Fatal(err)
	}
	if !os.SameFile(got, want) {
		t.Error("the later container's hooks got a holder in a namespace of their own, not the stand-ins'")
	}
}
