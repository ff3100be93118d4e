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

// TestCLIRunBadInput: `kiln run` refuses what it cannot run with an error naming the thing at fault ({bundle}
// in want stands for the bundle directory), and leaves no VM, virtiofsd, mount or state behind. The cases that
// also reach Kiln through containerd (integration/containerd's TestKilnBadInput) are testbundle.BadInput's.
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
	type badCase struct {
		testbundle.BadCase
		id string
		// bundle changes the written bundle.
		bundle func(t *testing.T, dir string)
		// config replaces the test's configuration.
		config string
	}
	cases := []badCase{
		{BadCase: testbundle.BadCase{Name: "config.json missing", Want: []string{"{bundle}", "read config.json", "no such file"}},
			bundle: func(t *testing.T, dir string) { remove(t, filepath.Join(dir, "config.json")) }},
		{BadCase: testbundle.BadCase{Name: "config.json invalid", Want: []string{"{bundle}", "parse config.json"}},
			bundle: func(t *testing.T, dir string) { write(t, filepath.Join(dir, "config.json"), `{"process": `) }},
		{BadCase: testbundle.BadCase{Name: "config.json without a process", Want: []string{"{bundle}", "config.json has no process"}},
			bundle: func(t *testing.T, dir string) {
				write(t, filepath.Join(dir, "config.json"), `{"root":{"path":"rootfs"}}`)
			}},
		{BadCase: testbundle.BadCase{Name: "rootfs absent", Want: []string{"{bundle}/rootfs", "no such file"}},
			bundle: func(t *testing.T, dir string) { remove(t, filepath.Join(dir, "rootfs")) }},
		// A limit past what any VM can grow to.
		{BadCase: testbundle.BadCase{Name: "huge memory limit", Spec: func(s *specs.Spec) {
			s.Linux.Resources.Memory = &specs.LinuxMemory{Limit: ptr(int64(math.MaxInt64))}
		}, Want: []string{"memory limit", "hypervisor.memory_max_mib"}}},
		{BadCase: testbundle.BadCase{Name: "id with a slash", Want: []string{`container id "bad/id"`}}, id: "bad/id"},
		{BadCase: testbundle.BadCase{Name: "id of dots", Want: []string{`container id ".."`}}, id: ".."},
		{BadCase: testbundle.BadCase{Name: "id climbing out", Want: []string{`container id "../escape"`}}, id: "../escape"},
	}
	for _, bc := range testbundle.BadInput(kernel, initrd, testbundle.FailingQEMU(t)) {
		tc := badCase{BadCase: bc}
		if bc.Hypervisor != "" {
			tc.config = config(bc.Hypervisor)
		}
		cases = append(cases, tc)
	}
	for _, tc := range cases {
		t.Run(tc.Name, func(t *testing.T) {
			dir := t.TempDir()
			spec := testbundle.Spec("true")
			if tc.Spec != nil {
				tc.Spec(spec)
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
			for _, w := range tc.Want {
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
