package integration

import (
	"bytes"
	"errors"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/kiln-runtime/kiln/integration/testbundle"
)

// fakeQEMU writes a "QEMU" that fails at once with a message, in a directory the unprivileged user QEMU runs as
// (hypervisor.user) can reach.
func fakeQEMU(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "kiln-fakeqemu-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "qemu-system-x86_64")
	if err := os.WriteFile(path, []byte("#!/bin/sh\necho 'fake-qemu: refusing to start' >&2\nexit 1\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	return path
}

// TestCLIRunBadInput: `kiln run` refuses what it cannot run with an error naming the thing at fault ({bundle}
// in want stands for the bundle directory), and leaves no VM, virtiofsd, mount or state behind. The cases that
// also reach Kiln through containerd are in integration/containerd's TestKilnBadInput.
func TestCLIRunBadInput(t *testing.T) {
	bin, cfg, stateRoot := kilnCLI(t)
	share := requireVM(t)
	kernel, initrd := filepath.Join(share, "vmlinuz"), filepath.Join(share, "initrd.img")
	config := func(hypervisor string) string {
		path := filepath.Join(t.TempDir(), "config.toml")
		body := fmt.Sprintf("[hypervisor]\n%s\n[runtime]\nstate_dir = %q\n", hypervisor, stateRoot)
		if err := os.WriteFile(path, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
		return path
	}
	resources := func(change func(*specs.LinuxResources)) func(*specs.Spec) {
		return func(s *specs.Spec) { change(s.Linux.Resources) }
	}
	cases := []struct {
		name string
		id   string
		// spec changes the spec before the bundle is written; bundle changes the written bundle.
		spec   func(*specs.Spec)
		bundle func(t *testing.T, dir string)
		// config replaces the test's configuration.
		config string
		want   []string
	}{
		{name: "config.json missing", bundle: func(t *testing.T, dir string) { remove(t, filepath.Join(dir, "config.json")) },
			want: []string{"{bundle}", "read config.json", "no such file"}},
		{name: "config.json invalid", bundle: func(t *testing.T, dir string) { write(t, filepath.Join(dir, "config.json"), `{"process": `) },
			want: []string{"{bundle}", "parse config.json"}},
		{name: "config.json without a process", bundle: func(t *testing.T, dir string) {
			write(t, filepath.Join(dir, "config.json"), `{"root":{"path":"rootfs"}}`)
		},
			want: []string{"{bundle}", "config.json has no process"}},
		{name: "rootfs absent", bundle: func(t *testing.T, dir string) { remove(t, filepath.Join(dir, "rootfs")) },
			want: []string{"{bundle}/rootfs", "no such file"}},
		{name: "unknown namespace type", spec: func(s *specs.Spec) {
			s.Linux.Namespaces = append(s.Linux.Namespaces, specs.LinuxNamespace{Type: "bogus"})
		}, want: []string{`linux.namespaces[6]: unknown namespace type "bogus"`}},
		{name: "negative memory limit", spec: resources(func(r *specs.LinuxResources) {
			r.Memory = &specs.LinuxMemory{Limit: ptr(int64(-5))}
		}), want: []string{"linux.resources.memory.limit = -5"}},
		{name: "negative CPU quota", spec: resources(func(r *specs.LinuxResources) {
			r.CPU = &specs.LinuxCPU{Quota: ptr(int64(-2)), Period: ptr(uint64(100000))}
		}), want: []string{"linux.resources.cpu.quota = -2"}},
		{name: "huge memory limit", spec: resources(func(r *specs.LinuxResources) {
			r.Memory = &specs.LinuxMemory{Limit: ptr(int64(math.MaxInt64))}
		}), want: []string{"memory limit", "more than its pod's VM has"}},
		// More than the 4 MiB one message of the agent API (ttrpc) holds.
		{name: "spec larger than the agent API carries", spec: func(s *specs.Spec) {
			s.Process.Env = append(s.Process.Env, "BIG="+strings.Repeat("x", 4<<20))
		}, want: []string{"config.json is larger than 4128768 bytes"}},
		{name: "bind source missing", spec: func(s *specs.Spec) {
			s.Mounts = append(s.Mounts, specs.Mount{Type: "bind", Source: "/nonexistent/kiln-bind-source", Destination: "/mnt/x", Options: []string{"rbind"}})
		}, want: []string{"/nonexistent/kiln-bind-source", "/mnt/x"}},
		{name: "id with a slash", id: "bad/id", want: []string{`container id "bad/id"`}},
		{name: "id of dots", id: "..", want: []string{`container id ".."`}},
		{name: "id climbing out", id: "../escape", want: []string{`container id "../escape"`}},
		{name: "missing kernel", config: config(fmt.Sprintf("kernel = %q\ninitrd = %q", "/nonexistent/vmlinuz", initrd)),
			want: []string{"hypervisor.kernel", "/nonexistent/vmlinuz"}},
		{name: "missing initrd", config: config(fmt.Sprintf("kernel = %q\ninitrd = %q", kernel, "/nonexistent/initrd.img")),
			want: []string{"hypervisor.initrd", "/nonexistent/initrd.img"}},
		{name: "QEMU exits at once", config: config(fmt.Sprintf("kernel = %q\ninitrd = %q\npath = %q", kernel, initrd, fakeQEMU(t))),
			want: []string{"QEMU", "fake-qemu: refusing to start"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			spec := testbundle.Spec("true")
			if tc.spec != nil {
				tc.spec(spec)
			}
			if err := testbundle.Write(dir, spec); err != nil {
				t.Fatal(err)
			}
			if tc.bundle != nil {
				tc.bundle(t, dir)
			}
			id, config := tc.id, tc.config
			if id == "" {
				id = "bad"
			}
			if config == "" {
				config = cfg
			}
			cmd := exec.Command(bin, "--config", config, "run", "--bundle", dir, id)
			var stderr bytes.Buffer
			cmd.Stderr = &stderr
			err := cmd.Run()
			if exitCode(err) != 1 {
				t.Fatalf("kiln run: %v, want exit status 1 (an error); stderr:\n%s", err, stderr.String())
			}
			for _, w := range tc.want {
				if w = strings.ReplaceAll(w, "{bundle}", dir); !strings.Contains(stderr.String(), w) {
					t.Errorf("error does not name %q:\n%s", w, stderr.String())
				}
			}
			checkRunLeftovers(t, stateRoot)
		})
	}
}

func ptr[T any](v T) *T { return &v }

func remove(t *testing.T, path string) {
	t.Helper()
	if err := os.RemoveAll(path); err != nil {
		t.Fatal(err)
	}
}

func write(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

// exitCode is a finished command's exit status (-1 when it did not run).
func exitCode(err error) int {
	var ee *exec.ExitError
	if err == nil {
		return 0
	}
	if errors.As(err, &ee) {
		return ee.ExitCode()
	}
	return -1
}
