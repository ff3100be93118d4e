package vmtest

import (
	"context"
	"encoding/json"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containerd/ttrpc"
	"github.com/opencontainers/runc/libcontainer/specconv"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/sirupsen/logrus"

	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
	"github.com/kiln-runtime/kiln/runtime/sandbox"
	"github.com/kiln-runtime/kiln/vm/accel"
	"github.com/kiln-runtime/kiln/vm/qemu"
)

func repoRoot(t testing.TB) string {
	t.Helper()
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			t.Fatal("go.mod not found")
		}
		dir = parent
	}
}

// guest is a booted VM running the agent, with a busybox rootfs per
// container id under its shared directory.
type guest struct {
	m          *qemu.Machine
	shared     string
	containers agentv1.ContainersClient
}

func run(t testing.TB, dir, name string, args ...string) {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Dir = dir
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%s %v: %v\n%s", name, args, err, b)
	}
}

func bootGuest(t *testing.T) *guest {
	t.Helper()
	if testing.Short() {
		t.Skip("boots a QEMU guest")
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	root := repoRoot(t)
	tmp := t.TempDir()
	agentBin := filepath.Join(tmp, "kiln-agent")
	cmd := exec.Command("go", "build", "-trimpath", "-tags", "seccomp netgo osusergo runc_nocriu",
		"-ldflags", "-s -w -extldflags -static", "-o", agentBin, "./cmd/kiln-agent")
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=1")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build agent: %v\n%s", err, b)
	}
	imgDir := filepath.Join(tmp, "img")
	// The kernel `make image` built, with this agent.
	share := filepath.Join(root, "_output", "share", "kiln")
	release, err := os.ReadFile(filepath.Join(share, "kernel-release"))
	if err != nil {
		t.Fatalf("guest image missing (%v): run `make image`", err)
	}
	run(t, root, filepath.Join(root, "_output", "tools", "bin", "kiln-image"), "-q", "--init", agentBin,
		"--out", imgDir, "--kernel", filepath.Join(share, "vmlinuz"), "--kernel-release", strings.TrimSpace(string(release)))

	shared := filepath.Join(tmp, "shared")
	if err := os.MkdirAll(shared, 0o755); err != nil {
		t.Fatal(err)
	}
	choice, err := accel.DefaultHost().Detect("auto")
	if err != nil {
		t.Fatal(err)
	}
	stateRoot, err := os.MkdirTemp("", "kiln-vmtest-")
	if err != nil {
		t.Fatal(err)
	}
	log := logrus.New()
	log.SetLevel(logrus.WarnLevel)
	if os.Getenv("KILN_VMTEST_DEBUG") != "" {
		log.SetLevel(logrus.DebugLevel)
	}
	m, err := qemu.New(qemu.Config{
		ID: "vmtest", StateRoot: stateRoot, QEMU: "qemu-system-x86_64", Accel: choice.Kind,
		VCPUs: 1, MemoryMiB: 512,
		Kernel: filepath.Join(imgDir, "vmlinuz"), Initrd: filepath.Join(imgDir, "initrd.img"),
		KernelParams: []string{"kiln.log=debug"},
		StopTimeout:  3 * time.Second, SharedDir: shared, ConsoleToLog: true,
		Log: logrus.NewEntry(log),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = m.Stop(context.Background())
		if t.Failed() {
			if b, err := os.ReadFile(m.ConsolePath()); err == nil {
				t.Logf("guest console:\n%s", tail(string(b), 8000))
			}
		}
		os.RemoveAll(stateRoot)
	})
	sb, err := sandbox.Start(context.Background(), m, sandbox.Options{DialTimeout: 90 * time.Second})
	if err != nil {
		t.Fatalf("start sandbox: %v", err)
	}
	t.Cleanup(func() { _ = sb.Stop(context.Background()) })
	conn, err := m.DialVsock(context.Background(), 1024)
	if err != nil {
		t.Fatal(err)
	}
	client := ttrpc.NewClient(conn)
	t.Cleanup(func() { client.Close() })
	return &guest{m: m, shared: shared, containers: agentv1.NewContainersClient(client)}
}

func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

// rootfs makes <shared>/<id>/rootfs with busybox and a small user database.
func (g *guest) rootfs(t *testing.T, id string) string {
	t.Helper()
	dir := filepath.Join(g.shared, id, "rootfs")
	for _, d := range []string{"bin", "etc", "proc", "sys", "dev", "tmp", "root"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	b, err := os.ReadFile("/bin/busybox")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "bin", "busybox"), b, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, app := range []string{"sh", "echo", "cat", "id", "sleep", "hostname", "stty", "head", "dd", "sha256sum", "grep", "ls", "true", "mount", "tail", "wc", "ps", "kill", "printf"} {
		if err := os.Symlink("busybox", filepath.Join(dir, "bin", app)); err != nil {
			t.Fatal(err)
		}
	}
	files := map[string]string{
		"etc/passwd": "root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000:Alice:/home/alice:/bin/sh\n",
		"etc/group":  "root:x:0:\nalice:x:1000:\nstaff:x:50:alice\naudio:x:29:\n",
	}
	for name, text := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return id + "/rootfs"
}

// spec is runc's default spec running args.
func spec(t *testing.T, args []string, mutate func(*specs.Spec)) []byte {
	t.Helper()
	s := specconv.Example()
	s.Process.Terminal = false
	s.Process.Args = args
	s.Root.Path = "rootfs"
	if mutate != nil {
		mutate(s)
	}
	b, err := json.Marshal(s)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// streams opens the stdio connections named, under key.
func (g *guest) streams(t *testing.T, key string, names ...string) map[string]net.Conn {
	t.Helper()
	out := map[string]net.Conn{}
	for _, n := range names {
		c, err := g.m.DialVsock(context.Background(), 1025)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := io.WriteString(c, key+" "+n+"\n"); err != nil {
			t.Fatal(err)
		}
		out[n] = c
		t.Cleanup(func() { c.Close() })
	}
	return out
}

// readAll collects a connection's bytes in the background.
func readAll(c net.Conn) <-chan string {
	ch := make(chan string, 1)
	go func() {
		b, _ := io.ReadAll(c)
		ch <- string(b)
	}()
	return ch
}

func recv(t *testing.T, ch <-chan string) string {
	t.Helper()
	select {
	case s := <-ch:
		return s
	case <-time.After(60 * time.Second):
		t.Fatal("stream did not end")
		return ""
	}
}

func trim(s string) string { return strings.TrimSpace(s) }

func jsonMarshal(v any) ([]byte, error) { return json.Marshal(v) }
