package integration

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/sirupsen/logrus"

	"github.com/kiln-runtime/kiln/integration/testbundle"
	"github.com/kiln-runtime/kiln/runtime/container"
	"github.com/kiln-runtime/kiln/runtime/sandbox"
	"github.com/kiln-runtime/kiln/runtime/share"
	"github.com/kiln-runtime/kiln/runtime/stdio"
	"github.com/kiln-runtime/kiln/vm/qemu"
)

// containerVM is a booted guest with the real agent, a shared directory and a container manager. Containers
// started through it are deleted and checked for leftovers when their subtest ends; the VM, its virtiofsd and
// the share are checked when the test ends.
type containerVM struct {
	m      *qemu.Machine
	sb     *sandbox.Sandbox
	sh     *share.Share
	mgr    *container.Manager
	bundle string // a bundle directory whose rootfs/ is a busybox root

	mu     sync.Mutex
	events []container.Event
}

// newContainerVM boots the standard guest image with memMiB of RAM and a share.
func newContainerVM(t *testing.T, memMiB int) *containerVM {
	t.Helper()
	imgShare := requireVM(t)
	bundle := t.TempDir()
	if err := testbundle.Rootfs(filepath.Join(bundle, "rootfs")); err != nil {
		t.Fatal(err)
	}
	shareRoot, err := os.MkdirTemp("", "kiln-it-share-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if mps := mountsUnder(shareRoot); len(mps) > 0 {
			t.Errorf("leftover mounts under the share root: %v", mps)
		}
		if entries, _ := os.ReadDir(shareRoot); len(entries) > 0 {
			t.Errorf("leftover in share root %s: %d entries", shareRoot, len(entries))
		}
		_ = os.Remove(shareRoot)
	})
	sh, err := share.New(filepath.Join(shareRoot, "share"))
	if err != nil {
		t.Fatal(err)
	}
	var stateRoot string
	m := testMachine(t, filepath.Join(imgShare, "vmlinuz"), filepath.Join(imgShare, "initrd.img"), func(c *qemu.Config) {
		c.MemoryMiB = memMiB
		stateRoot = c.StateRoot
		withShare(c, sh)
	})
	t.Cleanup(func() {
		if pids := virtiofsdProcesses(stateRoot, shareRoot); len(pids) > 0 {
			t.Errorf("leftover virtiofsd process(es): %v", pids)
		}
		if mps := mountsUnder(stateRoot); len(mps) > 0 {
			t.Errorf("leftover mounts under the state root: %v", mps)
		}
	})
	// Cleanups run last-in first-out: the share goes after the VM that used it.
	t.Cleanup(func() {
		if err := sh.Close(); err != nil {
			t.Errorf("close share: %v", err)
		}
	})
	start := time.Now()
	sb := startSandbox(t, m, 60*time.Second)
	t.Logf("guest ready in %s", time.Since(start).Round(time.Millisecond))
	v := &containerVM{m: m, sb: sb, sh: sh, bundle: bundle}
	log := logrus.New()
	log.SetLevel(logrus.WarnLevel)
	events, err := sb.StreamClient(testCtx(t, time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	v.mgr = container.NewManager(sb.Containers(), m, container.Options{
		Events: events,
		Log:    logrus.NewEntry(log).WithField("test", t.Name()),
		OnEvent: func(e container.Event) {
			v.mu.Lock()
			v.events = append(v.events, e)
			v.mu.Unlock()
		},
	})
	t.Cleanup(func() { _ = v.mgr.Close() })
	return v
}

// spec returns the `runc spec` configuration running args.
func (v *containerVM) spec(args ...string) *specs.Spec { return testbundle.Spec(args...) }

// create shares the busybox root (or rootfs when not empty) and the spec's bind sources for a container id and
// creates it. Its deletion and the leftover checks are registered with t.
func (v *containerVM) create(t *testing.T, id string, spec *specs.Spec, rootfs string, io stdio.IO) *container.Container {
	t.Helper()
	ctx := testCtx(t, 60*time.Second)
	if rootfs == "" {
		rootfs = filepath.Join(v.bundle, "rootfs")
	}
	guestRoot, err := v.sh.AddRootfs(ctx, id, rootfs, spec.Root.Readonly)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := v.sh.RemoveContainer(context.Background(), id); err != nil {
			t.Errorf("remove container %s from share: %v", id, err)
		}
		if _, err := os.Lstat(filepath.Join(v.sh.Dir(), "mounts", id)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("container %s left its directory in the share (%v)", id, err)
		}
	})
	if err := v.sh.ShareSpecMounts(ctx, id, v.bundle, spec); err != nil {
		t.Fatal(err)
	}
	raw, err := json.Marshal(spec)
	if err != nil {
		t.Fatal(err)
	}
	c, err := v.mgr.Create(ctx, container.CreateOptions{ID: id, Spec: raw, Rootfs: guestRoot, IO: io})
	if err != nil {
		t.Fatalf("create container %s: %v", id, err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := c.Delete(ctx, true); err != nil {
			t.Errorf("delete container %s: %v", id, err)
		}
		if _, err := c.Pids(ctx); err == nil {
			t.Errorf("the guest still lists processes of deleted container %s", id)
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
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil
	}
	defer f.Close()
	var out []string
	s := bufio.NewScanner(f)
	for s.Scan() {
		fields := strings.Fields(s.Text())
		if len(fields) > 4 && (fields[4] == dir || strings.HasPrefix(fields[4], dir+"/")) {
			out = append(out, fields[4])
		}
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
