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

	"github.com/kiln-runtime/kiln/integration/testbundle"
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
	type badCase struct {
		name string
		id   string
		opts []oci.SpecOpts
		// config replaces the test's Kiln configuration.
		config string
		want   []string
	}
	cases := []badCase{
		// containerd sizes the VM by the container's limits.
		{name: "huge memory limit", opts: []oci.SpecOpts{withResources(func(r *specs.LinuxResources) {
			r.Memory = &specs.LinuxMemory{Limit: ptr(int64(math.MaxInt64))}
		})}, want: []string{"8796093022208 MiB of memory", "a VM has 64 to 1048576 MiB"}},
		{name: "huge CPU quota", opts: []oci.SpecOpts{oci.WithCPUCFS(math.MaxInt64, 1)},
			want: []string{"9223372036854775807 vCPUs", "a VM has 1 to 64"}},
		// containerd refuses these itself, before any shim runs.
		{name: "id with a slash", id: "bad/id", want: []string{"bad/id"}},
		{name: "id of dots", id: "..", want: []string{`".."`}},
	}
	for _, bc := range testbundle.BadInput(kernel, initrd, testbundle.FailingQEMU(t)) {
		var opts []oci.SpecOpts
		if bc.Spec != nil {
			change := bc.Spec
			opts = append(opts, func(_ context.Context, _ oci.Client, _ *containers.Container, s *oci.Spec) error {
				change(s)
				return nil
			})
		}
		tc := badCase{name: bc.Name, opts: opts, want: bc.Want}
		if bc.Hypervisor != "" {
			tc.config = kilnConfig(bc.Hypervisor)
		}
		cases = append(cases, tc)
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

// TestKilnPoststopAfterFailedCreate: a create that fails once its spec was accepted runs the container's
// poststop hooks, as runc's destroy does, so that a hook undoing a create hook's work (nerdctl's CNI DEL, which
// releases the address its ADD leased) runs: for a process the image does not have (refused by the guest at
// create) and for a VM that does not boot. A spec Kiln refuses runs none.
func TestKilnPoststopAfterFailedCreate(t *testing.T) {
	k := startKiln(t)
	dir := testbundle.PublicDir(t)
	hook := filepath.Join(dir, "hook")
	if err := os.WriteFile(hook, []byte("#!/bin/sh\necho $1 >> "+dir+"/runs-$2\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	failingQEMU := filepath.Join(t.TempDir(), "kiln.toml")
	body := fmt.Sprintf("[hypervisor]\nkernel = %q\ninitrd = %q\npath = %q\n[runtime]\nstate_dir = %q\n",
		filepath.Join(k.assets, "vmlinuz"), filepath.Join(k.assets, "initrd.img"), testbundle.FailingQEMU(t), k.d.StateDir())
	if err := os.WriteFile(failingQEMU, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	c, err := client.New(k.d.Address, client.WithDefaultNamespace(Namespace))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for i, tc := range []struct {
		name   string
		config string
		opts   []oci.SpecOpts
		want   string
	}{
		{"a process the image lacks", k.cfg, []oci.SpecOpts{oci.WithProcessArgs("/kiln-no-such-program")}, "createRuntime\npoststop\n"},
		{"a VM that does not boot", failingQEMU, nil, "createRuntime\npoststop\n"},
		{"a refused spec", k.cfg, []oci.SpecOpts{oci.WithHostNamespace(specs.UTSNamespace)}, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
			defer cancel()
			img, err := c.GetImage(ctx, BusyboxRef)
			if err != nil {
				t.Fatal(err)
			}
			name := fmt.Sprint(i)
			withHooks := func(_ context.Context, _ oci.Client, _ *containers.Container, s *oci.Spec) error {
				s.Hooks = &specs.Hooks{
					CreateRuntime: []specs.Hook{{Path: hook, Args: []string{hook, "createRuntime", name}}},
					Poststop:      []specs.Hook{{Path: hook, Args: []string{hook, "poststop", name}}},
				}
				return nil
			}
			id := "kiln-poststop-" + name
			opts := append([]oci.SpecOpts{oci.WithImageConfig(img), oci.WithProcessArgs("true"), withHooks}, tc.opts...)
			err = createTask(ctx, c, id, img, tc.config, opts)
			k.remove(t, id)
			if err == nil {
				t.Fatal("the task was created")
			}
			got, _ := os.ReadFile(filepath.Join(dir, "runs-"+name))
			if string(got) != tc.want {
				t.Errorf("hooks run %q, want %q (create: %v)", got, tc.want, err)
			}
			for _, l := range leftovers(k.d) {
				t.Error(l)
			}
		})
	}
}
