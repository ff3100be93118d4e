package vmtest

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"math/rand"
	"slices"
	"strings"
	"testing"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
)

// runOut creates, starts and waits for a container with stdout and stderr,
// returning them and the exit status; the container is removed.
func (g *guest) runOut(t *testing.T, id string, spec []byte) (stdout, stderr string, status uint32) {
	t.Helper()
	ctx := context.Background()
	conns := g.streams(t, "k-"+id, "stdout", "stderr")
	out, errs := readAll(conns["stdout"]), readAll(conns["stderr"])
	_, err := g.containers.CreateContainer(ctx, &agentv1.CreateContainerRequest{
		ContainerId: id, OciSpec: spec, Rootfs: g.rootfs(t, id),
		Stdio: &agentv1.Stdio{StdioKey: "k-" + id, Stdout: true, Stderr: true},
	})
	if err != nil {
		t.Fatalf("create: %v", err)
	}
	if _, err := g.containers.StartContainer(ctx, &agentv1.StartContainerRequest{ContainerId: id}); err != nil {
		t.Fatalf("start: %v", err)
	}
	w, err := g.containers.WaitProcess(ctx, &agentv1.WaitProcessRequest{ContainerId: id})
	if err != nil {
		t.Fatalf("wait: %v", err)
	}
	stdout, stderr = recv(t, out), recv(t, errs)
	if _, err := g.containers.RemoveContainer(ctx, &agentv1.RemoveContainerRequest{ContainerId: id}); err != nil {
		t.Fatalf("remove: %v", err)
	}
	return stdout, stderr, w.GetExitStatus()
}

func TestContainers(t *testing.T) {
	g := bootGuest(t)
	ctx := context.Background()
	events, err := g.containers.Events(ctx, &agentv1.EventsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	eventCh := make(chan *agentv1.Event, 100)
	go func() {
		for {
			e, err := events.Recv()
			if err != nil {
				close(eventCh)
				return
			}
			eventCh <- e
		}
	}()
	waitEvent := func(t *testing.T, match func(*agentv1.Event) bool) {
		t.Helper()
		timeout := time.After(60 * time.Second)
		for {
			select {
			case e, ok := <-eventCh:
				if !ok {
					t.Fatal("event stream ended")
				}
				if match(e) {
					return
				}
			case <-timeout:
				t.Fatal("event not seen")
			}
		}
	}

	t.Run("exit status and output", func(t *testing.T) {
		out, errs, st := g.runOut(t, "c1", spec(t, []string{"sh", "-c", "echo out; echo err >&2; exit 7"}, nil))
		if out != "out\n" || errs != "err\n" || st != 7 {
			t.Fatalf("stdout %q stderr %q status %d, want out, err, 7", out, errs, st)
		}
		waitEvent(t, func(e *agentv1.Event) bool {
			return e.GetExit().GetContainerId() == "c1" && e.GetExit().GetExitStatus() == 7
		})
	})

	t.Run("user and groups", func(t *testing.T) {
		out, errs, st := g.runOut(t, "user", spec(t, []string{"id"}, func(s *specs.Spec) {
			s.Process.User = specs.User{UID: 1000, GID: 1000, AdditionalGids: []uint32{50, 29}}
		}))
		if st != 0 || trim(out) != "uid=1000(alice) gid=1000(alice) groups=29(audio),50(staff)" {
			t.Fatalf("id: %q %q %d", out, errs, st)
		}
		out, errs, st = g.runOut(t, "username", spec(t, []string{"id"}, func(s *specs.Spec) {
			s.Process.User = specs.User{Username: "alice"}
		}))
		if st != 0 || !strings.Contains(out, "uid=1000(alice)") || !strings.Contains(out, "50(staff)") {
			t.Fatalf("id by name: %q %q %d", out, errs, st)
		}
	})

	t.Run("spec features", func(t *testing.T) {
		script := `hostname; ulimit -n; grep -E '^(CapEff|NoNewPrivs|Seccomp):' /proc/self/status; ` +
			`grep ' / ' /proc/self/mountinfo | grep -q ' ro,' && echo rootro; cat /proc/1/cmdline | head -c 2; echo; cd /proc 2>/dev/null || echo chdir-denied`
		out, errs, st := g.runOut(t, "feat", spec(t, []string{"sh", "-c", script}, func(s *specs.Spec) {
			s.Hostname = "kilnbox"
			s.Root.Readonly = true
			s.Process.NoNewPrivileges = true
			s.Process.Rlimits = []specs.POSIXRlimit{{Type: "RLIMIT_NOFILE", Hard: 321, Soft: 321}}
			s.Linux.Seccomp = &specs.LinuxSeccomp{DefaultAction: specs.ActAllow, Syscalls: []specs.LinuxSyscall{
				{Names: []string{"chdir"}, Action: specs.ActErrno}}}
		}))
		t.Logf("features: %q %q", out, errs)
		for _, want := range []string{"kilnbox\n", "321\n", "NoNewPrivs:\t1", "Seccomp:\t2", "CapEff:\t0000000020000420", "rootro", "sh", "chdir-denied"} {
			if !strings.Contains(out, want) {
				t.Errorf("output lacks %q", want)
			}
		}
		if st != 0 {
			t.Errorf("status %d", st)
		}
	})

	t.Run("exec, signal, stdin", func(t *testing.T) {
		id := "long"
		conns := g.streams(t, "k-long", "stdout")
		out := readAll(conns["stdout"])
		_, err := g.containers.CreateContainer(ctx, &agentv1.CreateContainerRequest{
			ContainerId: id, Rootfs: g.rootfs(t, id),
			OciSpec: spec(t, []string{"sh", "-c", "trap 'echo term; exit 3' TERM; echo ready; while true; do sleep 0.1; done"}, nil),
			Stdio:   &agentv1.Stdio{StdioKey: "k-long", Stdout: true},
		})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := g.containers.StartContainer(ctx, &agentv1.StartContainerRequest{ContainerId: id}); err != nil {
			t.Fatal(err)
		}
		// 10 MiB through stdin and back through an exec.
		data := make([]byte, 10<<20)
		rand.New(rand.NewSource(1)).Read(data)
		ec := g.streams(t, "k-exec", "stdin", "stdout")
		echoed := readAll(ec["stdout"])
		proc, _ := jsonProcess([]string{"cat"})
		if _, err := g.containers.ExecProcess(ctx, &agentv1.ExecProcessRequest{ContainerId: id, ExecId: "cat", Process: proc,
			Stdio: &agentv1.Stdio{StdioKey: "k-exec", Stdin: true, Stdout: true}}); err != nil {
			t.Fatal(err)
		}
		go func() {
			ec["stdin"].Write(data)
			ec["stdin"].(interface{ CloseWrite() error }).CloseWrite()
		}()
		w, err := g.containers.WaitProcess(ctx, &agentv1.WaitProcessRequest{ContainerId: id, ExecId: "cat"})
		if err != nil || w.GetExitStatus() != 0 {
			t.Fatalf("wait exec: %v %v", w, err)
		}
		if got := recv(t, echoed); sha256.Sum256([]byte(got)) != sha256.Sum256(data) {
			t.Fatalf("stdin round trip: got %d bytes, want %d", len(got), len(data))
		}
		ps, err := g.containers.ListProcesses(ctx, &agentv1.ListProcessesRequest{ContainerId: id})
		if err != nil || len(ps.GetProcesses()) == 0 {
			t.Fatalf("list processes: %v %v", ps, err)
		}
		if _, err := g.containers.PauseContainer(ctx, &agentv1.PauseContainerRequest{ContainerId: id}); err != nil {
			t.Fatal(err)
		}
		if _, err := g.containers.PauseContainer(ctx, &agentv1.PauseContainerRequest{ContainerId: id}); err == nil {
			t.Error("pausing a paused container succeeded")
		}
		if _, err := g.containers.ResumeContainer(ctx, &agentv1.ResumeContainerRequest{ContainerId: id}); err != nil {
			t.Fatal(err)
		}
		st, err := g.containers.StatsContainer(ctx, &agentv1.StatsContainerRequest{ContainerId: id})
		if err != nil || st.GetPids().GetCurrent() == 0 || st.GetMemory().GetUsage() == 0 {
			t.Fatalf("stats: %v %v", st, err)
		}
		if _, err := g.containers.SignalProcess(ctx, &agentv1.SignalProcessRequest{ContainerId: id, Signal: 15}); err != nil {
			t.Fatal(err)
		}
		w, err = g.containers.WaitProcess(ctx, &agentv1.WaitProcessRequest{ContainerId: id})
		if err != nil || w.GetExitStatus() != 3 {
			t.Fatalf("wait init: %v %v", w, err)
		}
		if got := recv(t, out); got != "ready\nterm\n" {
			t.Errorf("stdout %q", got)
		}
		if _, err := g.containers.RemoveContainer(ctx, &agentv1.RemoveContainerRequest{ContainerId: id}); err != nil {
			t.Fatal(err)
		}
	})

	// The device cgroup (an eBPF program on cgroup v2) holds in the guest: a node the container may make is not
	// one it may open unless a rule allows it. Both ways, so that a filter allowing all or none fails.
	t.Run("device cgroup", func(t *testing.T) {
		script := `mknod /dev/serial c 4 64 || exit 9; if echo >/dev/serial; then echo opened; else echo denied; fi`
		for _, tc := range []struct {
			name  string
			allow bool
			want  string
		}{{"dev-denied", false, "denied"}, {"dev-allowed", true, "opened"}} {
			out, errs, st := g.runOut(t, tc.name, spec(t, []string{"sh", "-c", script}, func(s *specs.Spec) {
				caps := s.Process.Capabilities
				caps.Bounding = append(caps.Bounding, "CAP_MKNOD")
				caps.Effective = append(caps.Effective, "CAP_MKNOD")
				caps.Permitted = append(caps.Permitted, "CAP_MKNOD")
				if tc.allow {
					major, minor := int64(4), int64(64)
					s.Linux.Resources.Devices = append(s.Linux.Resources.Devices,
						specs.LinuxDeviceCgroup{Allow: true, Type: "c", Major: &major, Minor: &minor, Access: "rw"})
				}
			}))
			if st != 0 || trim(out) != tc.want {
				t.Errorf("%s: stdout %q stderr %q status %d, want %q", tc.name, out, errs, st, tc.want)
			}
		}
	})

	t.Run("killed by signal", func(t *testing.T) {
		// Without a pid namespace: a namespace's init ignores its own SIGKILL.
		_, _, st := g.runOut(t, "kill", spec(t, []string{"sh", "-c", "kill -9 $$"}, func(s *specs.Spec) {
			s.Linux.Namespaces = slices.DeleteFunc(s.Linux.Namespaces, func(ns specs.LinuxNamespace) bool {
				return ns.Type == specs.PIDNamespace
			})
		}))
		if st != 137 {
			t.Fatalf("status %d, want 137", st)
		}
	})

	t.Run("oom", func(t *testing.T) {
		limit := int64(32 << 20)
		_, _, st := g.runOut(t, "oom", spec(t, []string{"sh", "-c", "x=a; while true; do x=$x$x; done"}, func(s *specs.Spec) {
			s.Linux.Resources = &specs.LinuxResources{Memory: &specs.LinuxMemory{Limit: &limit}}
		}))
		if st != 137 {
			t.Errorf("status %d, want 137", st)
		}
		waitEvent(t, func(e *agentv1.Event) bool { return e.GetOom().GetContainerId() == "oom" })
	})

	t.Run("tty", func(t *testing.T) {
		id := "tty"
		conns := g.streams(t, "k-tty", "tty")
		_, err := g.containers.CreateContainer(ctx, &agentv1.CreateContainerRequest{
			ContainerId: id, Rootfs: g.rootfs(t, id),
			OciSpec: spec(t, []string{"sh", "-c", "stty size; read x; stty size; echo got $x"}, func(s *specs.Spec) {
				s.Process.Terminal = true
				s.Process.ConsoleSize = &specs.Box{Height: 24, Width: 80}
			}),
			Stdio: &agentv1.Stdio{StdioKey: "k-tty", Terminal: true, Stdin: true},
		})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := g.containers.StartContainer(ctx, &agentv1.StartContainerRequest{ContainerId: id}); err != nil {
			t.Fatal(err)
		}
		var buf bytes.Buffer
		readUntil(t, conns["tty"], &buf, "24 80")
		if _, err := g.containers.ResizeTTY(ctx, &agentv1.ResizeTTYRequest{ContainerId: id, Width: 100, Height: 40}); err != nil {
			t.Fatal(err)
		}
		io.WriteString(conns["tty"], "hello\n")
		readUntil(t, conns["tty"], &buf, "got hello")
		if !strings.Contains(buf.String(), "40 100") {
			t.Errorf("tty output %q lacks the new size", buf.String())
		}
		w, err := g.containers.WaitProcess(ctx, &agentv1.WaitProcessRequest{ContainerId: id})
		if err != nil || w.GetExitStatus() != 0 {
			t.Fatalf("wait: %v %v", w, err)
		}
		if _, err := g.containers.RemoveContainer(ctx, &agentv1.RemoveContainerRequest{ContainerId: id}); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("100 MiB stdout", func(t *testing.T) {
		start := time.Now()
		out, _, st := g.runOut(t, "big", spec(t, []string{"sh", "-c", "dd if=/dev/zero bs=1M count=100 2>/dev/null"}, nil))
		if st != 0 || len(out) != 100<<20 {
			t.Fatalf("got %d bytes status %d", len(out), st)
		}
		t.Logf("100 MiB in %v (%.1f MB/s)", time.Since(start), 100/time.Since(start).Seconds())
	})
}

func jsonProcess(args []string) ([]byte, error) {
	p := specs.Process{Args: args, Cwd: "/", Env: []string{"PATH=/bin"}}
	return jsonMarshal(p)
}

func readUntil(t *testing.T, r io.Reader, buf *bytes.Buffer, want string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	b := make([]byte, 4096)
	for !strings.Contains(buf.String(), want) {
		if time.Now().After(deadline) {
			t.Fatalf("tty output %q never had %q", buf.String(), want)
		}
		n, err := r.Read(b)
		buf.Write(b[:n])
		if err != nil {
			t.Fatalf("read tty: %v (have %q)", err, buf.String())
		}
	}
	_ = fmt.Sprint()
}
