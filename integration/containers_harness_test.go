package integration

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/moby/sys/mountinfo"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/sirupsen/logrus"

	"github.com/kiln-runtime/kiln/config"
	"github.com/kiln-runtime/kiln/integration/testbundle"
	"github.com/kiln-runtime/kiln/runtime/bundle"
	"github.com/kiln-runtime/kiln/runtime/container"
	"github.com/kiln-runtime/kiln/runtime/pod"
	"github.com/kiln-runtime/kiln/runtime/stdio"
)

// containerVM is a pod booted through runtime/pod, the way the shim boots one, with the real agent. Containers
// started through it are deleted and checked for leftovers when their subtest ends; the VM, its virtiofsd, the
// share and the state directory are checked when the test ends.
type containerVM struct {
	p      *pod.Pod
	bundle string // a bundle directory whose rootfs/ is a busybox root

	mu     sync.Mutex
	events []container.Event
}

// newContainerVM boots the standard guest image with memMiB of RAM in a private state directory.
func newContainerVM(t *testing.T, memMiB int) *containerVM {
	t.Helper()
	return newContainerVMWith(t, memMiB, nil, nil)
}

// newContainerVMWith is newContainerVM with the configuration changed by mutate and the pod's log entries also
// going to hook, when they are not nil.
func newContainerVMWith(t *testing.T, memMiB int, mutate func(*config.Config), hook logrus.Hook) *containerVM {
	t.Helper()
	return newNamedContainerVM(t, podID(t), memMiB, mutate, hook)
}

// newNamedContainerVM is newContainerVMWith for a pod with the given id, for tests that run several pods at once.
func newNamedContainerVM(t *testing.T, id string, memMiB int, mutate func(*config.Config), hook logrus.Hook) *containerVM {
	t.Helper()
	imgShare := requireVM(t)
	bundleDir := t.TempDir()
	if err := testbundle.Rootfs(filepath.Join(bundleDir, "rootfs")); err != nil {
		t.Fatal(err)
	}
	stateRoot, err := os.MkdirTemp("", "kiln-it-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if pids := qemuProcesses(id); len(pids) > 0 {
			t.Errorf("leftover QEMU process(es) for vm %s: %v", id, pids)
		}
		if pids := virtiofsdProcesses(stateRoot); len(pids) > 0 {
			t.Errorf("leftover virtiofsd process(es): %v", pids)
		}
		if mps := mountsUnder(stateRoot); len(mps) > 0 {
			t.Errorf("leftover mounts under the state root: %v", mps)
		}
		entries, _ := os.ReadDir(stateRoot)
		for _, e := range entries {
			t.Errorf("leftover in state root %s: %s", stateRoot, e.Name())
		}
		_ = os.Remove(stateRoot)
	})
	cfg := config.Default()
	cfg.Runtime.StateDir = stateRoot
	cfg.Hypervisor.Kernel = filepath.Join(imgShare, "vmlinuz")
	cfg.Hypervisor.Initrd = filepath.Join(imgShare, "initrd.img")
	cfg.Hypervisor.MemoryMiB = memMiB
	if mutate != nil {
		mutate(&cfg)
	}
	log := logrus.New()
	log.SetLevel(logrus.WarnLevel)
	if hook != nil {
		log.AddHook(hook)
	}
	v := &containerVM{bundle: bundleDir}
	start := time.Now()
	p, err := pod.New(testCtx(t, 2*time.Minute), pod.Options{
		ID: id, Config: cfg, Log: logrus.NewEntry(log).WithField("test", t.Name()),
		OnEvent: func(e container.Event) {
			v.mu.Lock()
			v.events = append(v.events, e)
			v.mu.Unlock()
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("pod ready in %s", time.Since(start).Round(time.Millisecond))
	v.p = p
	t.Cleanup(func() {
		if err := p.Close(context.Background()); err != nil {
			t.Errorf("close pod: %v", err)
		}
	})
	return v
}

// podID is the id of a test's pod, derived from the test's name.
func podID(t *testing.T) string {
	return strings.ToLower(strings.NewReplacer("/", "-", "_", "-").Replace(t.Name()))
}

// spec returns the `runc spec` configuration running args.
func (v *containerVM) spec(args ...string) *specs.Spec { return testbundle.Spec(args...) }

// installStatic builds the static program pkg (a package of this module, with env added to the build's) into the
// container root's /bin, under its package's name: Debian's busybox lacks what some tests run in the guest.
func (v *containerVM) installStatic(t *testing.T, pkg string, env ...string) {
	t.Helper()
	b, err := os.ReadFile(buildStatic(t, pkg, env...))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(v.bundle, "rootfs", "bin", filepath.Base(pkg)), b, 0o755); err != nil {
		t.Fatal(err)
	}
}

// create adds a container with the busybox root (or rootfs when not empty) and the spec's bind sources to the
// pod. Its deletion and the leftover checks are registered with t.
func (v *containerVM) create(t *testing.T, id string, spec *specs.Spec, rootfs string, io stdio.IO) *container.Container {
	t.Helper()
	ctx := testCtx(t, 60*time.Second)
	if rootfs == "" {
		rootfs = filepath.Join(v.bundle, "rootfs")
	}
	c, err := v.p.CreateContainer(ctx, pod.ContainerOptions{ID: id, Bundle: &bundle.Bundle{Dir: v.bundle, Spec: spec, Rootfs: rootfs}, IO: io})
	if err != nil {
		t.Fatalf("create container %s: %v", id, err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if _, err := v.p.DeleteContainer(ctx, c, true); err != nil {
			t.Errorf("delete container %s: %v", id, err)
		}
		if _, err := c.Pids(ctx); err == nil {
			t.Errorf("the guest still lists processes of deleted container %s", id)
		}
		if _, err := os.Lstat(filepath.Join(v.p.ShareDir(), "mounts", id)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("container %s left its directory in the share (%v)", id, err)
		}
	})
	return c
}

// run creates and starts a container and waits for its exit.
func (v *containerVM) run(t *testing.T, id string, spec *specs.Spec, io stdio.IO) container.Exit {
	t.Helper()
	c := v.create(t, id, spec, "", io)
	ctx := testCtx(t, 120*time.Second)
	if err := c.Start(ctx); err != nil {
		t.Fatalf("start container %s: %v", id, err)
	}
	e, err := c.Wait(ctx)
	if err != nil {
		t.Fatalf("wait for container %s: %v", id, err)
	}
	return e
}

// output runs a container without stdin and returns what it wrote and its exit status.
func (v *containerVM) output(t *testing.T, id string, spec *specs.Spec) (stdout, stderr string, status uint32) {
	t.Helper()
	var out, errOut bytes.Buffer
	e := v.run(t, id, spec, stdio.IO{Stdout: &out, Stderr: &errOut})
	return out.String(), errOut.String(), e.Status
}

// eventsFor returns the events seen so far for a container.
func (v *containerVM) eventsFor(id string) []container.Event {
	v.mu.Lock()
	defer v.mu.Unlock()
	var out []container.Event
	for _, e := range v.events {
		if e.ContainerID == id {
			out = append(out, e)
		}
	}
	return out
}

func testCtx(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// mountsUnder lists this mount namespace's mount points at or below dir.
func mountsUnder(dir string) []string {
	if dir == "" {
		return nil
	}
	infos, err := mountinfo.GetMounts(mountinfo.PrefixFilter(dir))
	if err != nil {
		return nil
	}
	out := make([]string, 0, len(infos))
	for _, m := range infos {
		out = append(out, m.Mountpoint)
	}
	return out
}

// virtiofsdProcesses lists virtiofsd processes whose command line names any of dirs.
func virtiofsdProcesses(dirs ...string) []string {
	var pids []string
	matches, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, f := range matches {
		b, err := os.ReadFile(f)
		if err != nil || !bytes.Contains(b, []byte("virtiofsd")) {
			continue
		}
		for _, d := range dirs {
			if d != "" && bytes.Contains(b, []byte(d)) {
				pids = append(pids, filepath.Base(filepath.Dir(f)))
				break
			}
		}
	}
	return pids
}

// lineWatcher is a writer that keeps everything written and lets a test wait for a substring.
type lineWatcher struct {
	mu   sync.Mutex
	buf  bytes.Buffer
	cond chan struct{}
}

func newLineWatcher() *lineWatcher { return &lineWatcher{cond: make(chan struct{}, 1)} }

func (w *lineWatcher) Write(p []byte) (int, error) {
	w.mu.Lock()
	w.buf.Write(p)
	w.mu.Unlock()
	select {
	case w.cond <- struct{}{}:
	default:
	}
	return len(p), nil
}

func (w *lineWatcher) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.buf.String()
}

// waitFor waits until the output contains s.
func (w *lineWatcher) waitFor(t *testing.T, s string, d time.Duration) {
	t.Helper()
	deadline := time.After(d)
	for !strings.Contains(w.String(), s) {
		select {
		case <-w.cond:
		case <-deadline:
			t.Fatalf("output never contained %q; got %q", s, w.String())
		}
	}
}

var _ io.Writer = (*lineWatcher)(nil)
