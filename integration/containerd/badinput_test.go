package containerd

import (
	"context"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	runtimeoptions "github.com/containerd/containerd/api/types/runtimeoptions/v1"
	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/containers"
	"github.com/containerd/containerd/v2/pkg/cio"
	"github.com/containerd/containerd/v2/pkg/oci"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// withResources changes the spec's resources, creating what is missing; the oci package's options take only
// unsigned or well-formed values.
func withResources(change func(*specs.LinuxResources)) oci.SpecOpts {
	return func(_ context.Context, _ oci.Client, _ *containers.Container, s *oci.Spec) error {
		if s.Linux == nil {
			s.Linux = &specs.Linux{}
		}
		if s.Linux.Resources == nil {
			s.Linux.Resources = &specs.LinuxResources{}
		}
		change(s.Linux.Resources)
		return nil
	}
}

func ptr[T any](v T) *T { return &v }

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

// TestKilnBadInput: input Kiln cannot run, given through containerd, is refused with an error that names the
// thing at fault, and leaves nothing: no shim, VM, virtiofsd, mount, state, and no tap or qdisc in the pod's
// network namespace (every case runs in a namespace CNI configured, so the taps would be made if the boot got
// that far).
func TestKilnBadInput(t *testing.T) {
	k := startKiln(t)
	n := newCNINet(t, "kilnnet-bad0", "10.231.7.0/24")
	before := netnsListing(t, n.Name)
	kilnConfig := func(hypervisor string) string {
		path := filepath.Join(t.TempDir(), "kiln.toml")
		body := fmt.Sprintf("[hypervisor]\n%s\n[runtime]\nstate_dir = %q\n", hypervisor, k.d.StateDir())
		if err := os.WriteFile(path, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
		return path
	}
	kernel, initrd := filepath.Join(k.assets, "vmlinuz"), filepath.Join(k.assets, "initrd.img")
	cases := []struct {
		name string
		id   string
		opts []oci.SpecOpts
		// config replaces the test's Kiln configuration.
		config string
		want   []string
	}{
		{name: "unknown namespace type", opts: []oci.SpecOpts{oci.WithLinuxNamespace(specs.LinuxNamespace{Type: "bogus"})},
			want: []string{`unknown namespace type "bogus"`, "linux.namespaces"}},
		{name: "negative memory limit", opts: []oci.SpecOpts{withResources(func(r *specs.LinuxResources) {
			r.Memory = &specs.LinuxMemory{Limit: ptr(int64(-5))}
		})}, want: []string{"linux.resources.memory.limit = -5", "-1 (no limit)"}},
		{name: "negative CPU quota", opts: []oci.SpecOpts{oci.WithCPUCFS(-2, 100000)},
			want: []string{"linux.resources.cpu.quota = -2"}},
		{name: "huge memory limit", opts: []oci.SpecOpts{withResources(func(r *specs.LinuxResources) {
			r.Memory = &specs.LinuxMemory{Limit: ptr(int64(math.MaxInt64))}
		})}, want: []string{"8796093022208 MiB of memory", "a VM has 64 to 1048576 MiB"}},
		{name: "huge CPU quota", opts: []oci.SpecOpts{oci.WithCPUCFS(math.MaxInt64, 1)},
			want: []string{"9223372036854775807 vCPUs", "a VM has 1 to 255"}},
		// More than the 4 MiB one message of the agent API (ttrpc) holds.
		{name: "spec larger than the agent API carries",
			opts: []oci.SpecOpts{oci.WithEnv([]string{"BIG=" + strings.Repeat("x", 4<<20)})},
			want: []string{"config.json is larger than 4128768 bytes"}},
		{name: "bind source missing", opts: []oci.SpecOpts{oci.WithMounts([]specs.Mount{{
			Type: "bind", Source: "/nonexistent/kiln-bind-source", Destination: "/mnt/x", Options: []string{"rbind"},
		}})}, want: []string{"/nonexistent/kiln-bind-source"}},
		{name: "missing kernel", config: kilnConfig(fmt.Sprintf("kernel = %q\ninitrd = %q", "/nonexistent/vmlinuz", initrd)),
			want: []string{"hypervisor.kernel", "/nonexistent/vmlinuz"}},
		{name: "missing initrd", config: kilnConfig(fmt.Sprintf("kernel = %q\ninitrd = %q", kernel, "/nonexistent/initrd.img")),
			want: []string{"hypervisor.initrd", "/nonexistent/initrd.img"}},
		{name: "QEMU exits at once", config: kilnConfig(fmt.Sprintf("kernel = %q\ninitrd = %q\npath = %q", kernel, initrd, fakeQEMU(t))),
			want: []string{"QEMU", "fake-qemu: refusing to start"}},
		// containerd refuses these itself, before any shim runs.
		{name: "id with a slash", id: "bad/id", want: []string{"bad/id"}},
		{name: "id of dots", id: "..", want: []string{`".."`}},
	}
	c, err := client.New(k.d.Address, client.WithDefaultNamespace(Namespace))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
			defer cancel()
			id := tc.id
			if id == "" {
				id = fmt.Sprintf("kiln-bad-%d", i)
			}
			cfg := tc.config
			if cfg == "" {
				cfg = k.cfg
			}
			img, err := c.GetImage(ctx, BusyboxRef)
			if err != nil {
				t.Fatal(err)
			}
			opts := append([]oci.SpecOpts{oci.WithImageConfig(img), oci.WithProcessArgs("true"),
				oci.WithLinuxNamespace(specs.LinuxNamespace{Type: specs.NetworkNamespace, Path: n.Path})}, tc.opts...)
			err = createTask(ctx, c, id, img, cfg, opts)
			k.remove(t, id)
			if err == nil {
				t.Fatal("the task was created")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error does not name %q:\n%v", w, err)
				}
			}
			for _, l := range leftovers(k.d) {
				t.Error(l)
			}
			if points, _ := MountsUnder(k.d.Dir); len(points) > 0 {
				t.Errorf("mounts left under containerd's directory: %v", points)
			}
			if after := netnsListing(t, n.Name); after != before {
				t.Errorf("the pod's network namespace changed:\nbefore:\n%s\nafter:\n%s", before, after)
			}
		})
	}
}

// createTask creates the container and its task, as `ctr run` does, and deletes the container again when the
// task cannot be created.
func createTask(ctx context.Context, c *client.Client, id string, img client.Image, cfg string, opts []oci.SpecOpts) error {
	// The snapshot is made before containerd sees the id; a refused id must not leave it behind.
	snap := fmt.Sprintf("kiln-bad-snap-%d", time.Now().UnixNano())
	ctr, err := c.NewContainer(ctx, id,
		client.WithImage(img), client.WithNewSnapshot(snap, img),
		client.WithRuntime(RuntimeName, &runtimeoptions.Options{ConfigPath: cfg}),
		client.WithNewSpec(opts...))
	if err != nil {
		_ = c.SnapshotService("").Remove(context.WithoutCancel(ctx), snap)
		return err
	}
	if _, err := ctr.NewTask(ctx, cio.NullIO); err != nil {
		if derr := ctr.Delete(context.WithoutCancel(ctx), client.WithSnapshotCleanup); derr != nil {
			return fmt.Errorf("%w (and delete the container: %v)", err, derr)
		}
		return err
	}
	return nil
}
