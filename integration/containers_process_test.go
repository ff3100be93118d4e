package integration

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/kiln-runtime/kiln/proto/lifecycle"
	"github.com/kiln-runtime/kiln/runtime/container"
	"github.com/kiln-runtime/kiln/runtime/stdio"
)

func testExec(t *testing.T, v *containerVM) {
	c := v.create(t, "exec", v.spec("sleep", "1000"), "", stdio.IO{})
	ctx := testCtx(t, 2*time.Minute)
	if err := c.Start(ctx); err != nil {
		t.Fatal(err)
	}

	t.Run("sees_the_container", func(t *testing.T) {
		var out, errOut bytes.Buffer
		proc := &specs.Process{
			Args: []string{"sh", "-c", `tr '\0' ' ' </proc/1/cmdline; echo; hostname; exit 3`},
			Env:  []string{"PATH=/bin"}, Cwd: "/",
		}
		p, err := c.Exec(ctx, "e1", proc, stdio.IO{Stdout: &out, Stderr: &errOut})
		if err != nil {
			t.Fatal(err)
		}
		e, err := p.Wait(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if e.Status != 3 || out.String() != "sleep 1000 \nrunc\n" {
			t.Errorf("exec: status %d stdout %q stderr %q, want 3 and the init's command line and hostname", e.Status, out.String(), errOut.String())
		}
		if _, err := c.DeleteProcess(ctx, "e1"); err != nil {
			t.Error(err)
		}
	})

	t.Run("as_another_user", func(t *testing.T) {
		var out bytes.Buffer
		proc := &specs.Process{Args: []string{"id", "-un"}, Env: []string{"PATH=/bin"}, Cwd: "/",
			User: specs.User{UID: 1234, GID: 1234}}
		p, err := c.Exec(ctx, "e2", proc, stdio.IO{Stdout: &out})
		if err != nil {
			t.Fatal(err)
		}
		if e, err := p.Wait(ctx); err != nil || e.Status != 0 || out.String() != "kiln\n" {
			t.Errorf("exec as kiln: %+v %v, stdout %q", e, err, out.String())
		}
	})

	t.Run("pids_stats_pause_resume", func(t *testing.T) {
		ps, err := c.Pids(ctx)
		if err != nil {
			t.Fatal(err)
		}
		found := false
		for _, p := range ps {
			found = found || p.GetPid() == c.Init().Pid()
		}
		if !found {
			t.Errorf("pids %v lack the init pid %d", ps, c.Init().Pid())
		}
		st, err := c.Stats(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if st.GetMemory().GetUsage() == 0 || st.GetPids().GetCurrent() == 0 {
			t.Errorf("implausible stats: memory %v pids %v", st.GetMemory(), st.GetPids())
		}
		if err := c.Pause(ctx); err != nil {
			t.Fatal(err)
		}
		if err := c.Resume(ctx); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("kill_gives_128_plus_signal", func(t *testing.T) {
		if err := c.Kill(ctx, uint32(syscall.SIGKILL), false); err != nil {
			t.Fatal(err)
		}
		e, err := c.Wait(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if e.Status != 128+uint32(syscall.SIGKILL) {
			t.Errorf("status %d after SIGKILL, want 137", e.Status)
		}
		if c.State() != lifecycle.Stopped {
			t.Errorf("state %s after the init died, want stopped", c.State())
		}
	})
}

func testSigterm(t *testing.T, v *containerVM) {
	out := newLineWatcher()
	spec := v.spec("sh", "-c", `trap 'echo got-term; exit 42' TERM; echo ready; while :; do sleep 0.1; done`)
	c := v.create(t, "sigterm", spec, "", stdio.IO{Stdout: out, Stderr: out})
	ctx := testCtx(t, time.Minute)
	if err := c.Start(ctx); err != nil {
		t.Fatal(err)
	}
	out.waitFor(t, "ready", 30*time.Second)
	if err := c.Kill(ctx, uint32(syscall.SIGTERM), false); err != nil {
		t.Fatal(err)
	}
	e, err := c.Wait(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if e.Status != 42 || !strings.Contains(out.String(), "got-term") {
		t.Errorf("status %d output %q, want 42 and got-term", e.Status, out.String())
	}
}

func testOOM(t *testing.T, v *containerVM) {
	spec := v.spec("dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1")
	limit := int64(32 << 20)
	spec.Linux.Resources.Memory = &specs.LinuxMemory{Limit: &limit, Swap: &limit}
	var errOut bytes.Buffer
	c := v.create(t, "oom", spec, "", stdio.IO{Stderr: &errOut})
	ctx := testCtx(t, time.Minute)
	if err := c.Start(ctx); err != nil {
		t.Fatal(err)
	}
	e, err := c.Wait(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if e.Status != 137 {
		t.Errorf("status %d, want 137 (killed by the OOM killer); stderr %q", e.Status, errOut.String())
	}
	// The OOM event comes from the cgroup's events file, and the exit event on the event stream: either may
	// trail Wait's answer, and they come in either order.
	saw := func(kind container.EventKind, status uint32) bool {
		for _, ev := range v.eventsFor("oom") {
			if ev.Kind == kind && ev.ExitStatus == status {
				return true
			}
		}
		return false
	}
	deadline := time.Now().Add(10 * time.Second)
	for !(saw(container.EventOOM, 0) && saw(container.EventExit, 137)) && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if !saw(container.EventOOM, 0) {
		t.Errorf("no OOM event for the container; events seen: %+v", v.eventsFor("oom"))
	}
	if !saw(container.EventExit, 137) {
		t.Errorf("no exit event with status 137: %+v", v.eventsFor("oom"))
	}
}

func testBigStdout(t *testing.T, v *containerVM) {
	const blobSize, copies = 1 << 20, 100
	blob := randomBytes(t, blobSize)
	// The blob sits in a root of this test's own, shared read-only.
	rootfs := filepath.Join(t.TempDir(), "rootfs")
	if err := copyTree(filepath.Join(v.bundle, "rootfs"), rootfs); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(rootfs, "blob"), blob, 0o644); err != nil {
		t.Fatal(err)
	}
	want := sha256.New()
	for range copies {
		want.Write(blob)
	}
	// The blob is read from the share once: the stream, not virtio-fs, is what is measured.
	spec := v.spec("sh", "-c", `cp /blob /dev/shm/blob && i=0 && while [ $i -lt 100 ]; do cat /dev/shm/blob; i=$((i+1)); done`)
	out := newHashWriter()
	var errOut bytes.Buffer
	c := v.create(t, "stdout", spec, rootfs, stdio.IO{Stdout: out, Stderr: &errOut})
	ctx := testCtx(t, 5*time.Minute)
	start := time.Now()
	if err := c.Start(ctx); err != nil {
		t.Fatal(err)
	}
	e, err := c.Wait(ctx)
	if err != nil {
		t.Fatal(err)
	}
	d := time.Since(start)
	t.Logf("100 MiB of stdout in %s (%.1f MB/s)", d.Round(time.Millisecond), float64(out.n)/d.Seconds()/1e6)
	if e.Status != 0 || out.n != blobSize*copies || out.sum() != hex.EncodeToString(want.Sum(nil)) {
		t.Errorf("status %d, %d bytes (want %d), sha256 match %t; stderr %q", e.Status, out.n, blobSize*copies,
			out.sum() == hex.EncodeToString(want.Sum(nil)), errOut.String())
	}
}

func testBigStdin(t *testing.T, v *containerVM) {
	in := randomBytes(t, 10<<20)
	wantSum := sha256.Sum256(in)
	out := newHashWriter()
	var errOut bytes.Buffer
	c := v.create(t, "stdin", v.spec("cat"), "", stdio.IO{Stdin: bytes.NewReader(in), Stdout: out, Stderr: &errOut})
	ctx := testCtx(t, 5*time.Minute)
	start := time.Now()
	if err := c.Start(ctx); err != nil {
		t.Fatal(err)
	}
	e, err := c.Wait(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("10 MiB through cat in %s", time.Since(start).Round(time.Millisecond))
	if e.Status != 0 || out.n != int64(len(in)) || out.sum() != hex.EncodeToString(wantSum[:]) {
		t.Errorf("status %d, %d bytes back of %d, sha256 match %t; stderr %q", e.Status, out.n, len(in),
			out.sum() == hex.EncodeToString(wantSum[:]), errOut.String())
	}
}

func testTTY(t *testing.T, v *containerVM) {
	spec := v.spec("sh", "-c", `test -t 0 && test -t 1 && echo on-a-tty; stty size; read x; stty size; echo got-$x`)
	spec.Process.Terminal = true
	inR, inW := io.Pipe()
	defer inW.Close()
	out := newLineWatcher()
	c := v.create(t, "tty", spec, "", stdio.IO{Terminal: true, Stdin: inR, Stdout: out})
	ctx := testCtx(t, time.Minute)
	if err := c.Init().Resize(ctx, 80, 24); err != nil {
		t.Fatal(err)
	}
	if err := c.Start(ctx); err != nil {
		t.Fatal(err)
	}
	out.waitFor(t, "24 80", 30*time.Second)
	if err := c.Init().Resize(ctx, 132, 43); err != nil {
		t.Fatal(err)
	}
	if _, err := inW.Write([]byte("line\n")); err != nil {
		t.Fatal(err)
	}
	e, err := c.Wait(ctx)
	if err != nil {
		t.Fatal(err)
	}
	got := out.String()
	for _, want := range []string{"on-a-tty", "24 80", "43 132", "got-line"} {
		if !strings.Contains(got, want) {
			t.Errorf("terminal output %q lacks %q", got, want)
		}
	}
	// A terminal turns "\n" into "\r\n": the output really came through a tty.
	if !strings.Contains(got, "on-a-tty\r\n") {
		t.Errorf("terminal output %q has no CRLF line ends", got)
	}
	if e.Status != 0 {
		t.Errorf("status %d", e.Status)
	}
}

// A directory mounted on the host after the VM started (here a fresh tmpfs) reaches the guest through the
// share and appears in a container's bind mount.
func testLateMount(t *testing.T, v *containerVM) {
	dir := t.TempDir()
	if err := unix.Mount("tmpfs", dir, "tmpfs", 0, "size=1m"); err != nil {
		t.Fatalf("mount tmpfs on the host: %v", err)
	}
	t.Cleanup(func() { _ = unix.Unmount(dir, unix.MNT_DETACH) })
	if err := os.WriteFile(filepath.Join(dir, "hello"), []byte("from the host\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	spec := v.spec("cat", "/mnt/hello")
	spec.Mounts = append(spec.Mounts, specs.Mount{Destination: "/mnt", Type: "bind", Source: dir, Options: []string{"rbind", "ro"}})
	out, errOut, status := v.output(t, "latemount", spec)
	if status != 0 || out != "from the host\n" {
		t.Errorf("status %d stdout %q stderr %q, want the host file", status, out, errOut)
	}
}
