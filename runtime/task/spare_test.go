package task

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/sirupsen/logrus"

	"github.com/kiln-runtime/kiln/config"
	"github.com/kiln-runtime/kiln/runtime/pod"
	"github.com/kiln-runtime/kiln/runtime/spare"
)

// A spare's shape goes through its command line as JSON and gives back the sized configuration; a shape that no
// configuration could have is refused, naming the key.
func TestSpareShape(t *testing.T) {
	cfg := config.Default()
	cfg.Hypervisor.Kernel, cfg.Hypervisor.Initrd = "", ""
	sized := cfg
	sized.Hypervisor.VCPUs, sized.Hypervisor.MemoryMiB = 3, 320
	sized.Hypervisor.KernelParams = []string{"quiet", "kiln.x=1"}
	b, err := json.Marshal(shapeOf(sized))
	if err != nil {
		t.Fatal(err)
	}
	var sh SpareShape
	if err := json.Unmarshal(b, &sh); err != nil {
		t.Fatal(err)
	}
	got, err := sh.sized(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, sized) {
		t.Errorf("shape %s gave %+v, want %+v", b, got.Hypervisor, sized.Hypervisor)
	}
	// A configuration that lists no kernel parameters ([]) gets a spare that compares equal to it.
	cfg.Hypervisor.KernelParams = []string{}
	if got, err := shapeOf(cfg).sized(cfg); err != nil || !reflect.DeepEqual(got, cfg) {
		t.Errorf("shape of a configuration with kernel_params = []: %+v, %v", got.Hypervisor, err)
	}
	// A task's VM that grows to its limits boots as one without them: its spare is of the configuration's shape.
	limited := cfg
	limited.Hypervisor.BootVCPUs, limited.Hypervisor.BootMemoryMiB = cfg.Hypervisor.VCPUs, cfg.Hypervisor.MemoryMiB
	limited.Hypervisor.VCPUs, limited.Hypervisor.MemoryMiB = cfg.Hypervisor.VCPUs+2, cfg.Hypervisor.MemoryMiB+512
	if got, want := shapeOf(limited), shapeOf(cfg); !reflect.DeepEqual(got, want) {
		t.Errorf("shape of a task with limits its VM grows to: %+v, want the configuration's %+v", got, want)
	}
	if _, err := (SpareShape{VCPUs: 0, MemoryMiB: 256}).sized(cfg); err == nil || !strings.Contains(err.Error(), "hypervisor.vcpus") {
		t.Errorf("a shape of 0 vCPUs: %v, want hypervisor.vcpus refused", err)
	}
}

// TestRetryBoot pins the spare's boot attempts: a boot that fails is tried again up to the limit, a boot that
// succeeds is not repeated, and a spare told to stop (its context done) gives up at once.
func TestRetryBoot(t *testing.T) {
	errBoot := errors.New("warm-up request timed out")
	tests := []struct {
		name      string
		failures  int // boots that fail before one succeeds
		cancelled bool
		wantCalls int
		wantErr   bool
	}{
		{"first boot", 0, false, 1, false},
		{"second boot", 1, false, 2, false},
		{"last boot", spareBootAttempts - 1, false, spareBootAttempts, false},
		{"every boot fails", spareBootAttempts + 5, false, spareBootAttempts, true},
		{"told to stop", spareBootAttempts + 5, true, 1, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			if tt.cancelled {
				cancel()
			}
			calls := 0
			err := retryBoot(ctx, logrus.NewEntry(logrus.New()), spareBootAttempts, func() error {
				calls++
				if calls <= tt.failures {
					return errBoot
				}
				return nil
			})
			if calls != tt.wantCalls || (err != nil) != tt.wantErr {
				t.Fatalf("%d boots, error %v; want %d boots, an error: %v", calls, err, tt.wantCalls, tt.wantErr)
			}
			if err != nil && !errors.Is(err, errBoot) {
				t.Fatalf("error %v, want the last boot's", err)
			}
		})
	}
}

// A spare waits for its turn and gives it back once booted; one that cannot take a turn boots without it, and one
// told to stop while it waits does not boot.
func TestSpareTurn(t *testing.T) {
	errLock := errors.New("spare boot turn: read-only file system")
	tests := []struct {
		name      string
		turnErr   error
		cancelled bool
		noTurn    bool
		wantErr   bool
		wantTaken bool // a turn was taken, and so must be released
	}{
		{name: "no turns", noTurn: true},
		{name: "a turn", wantTaken: true},
		{name: "no lock file", turnErr: errLock},
		{name: "told to stop while waiting", turnErr: context.Canceled, cancelled: true, wantErr: true},
		{name: "told to stop as the turn came", cancelled: true, wantErr: true, wantTaken: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			if tt.cancelled {
				cancel()
			}
			taken, released := 0, 0
			turn := func(ctx context.Context, vcpus int) (func(), error) {
				if vcpus != 2 {
					t.Errorf("turn asked for %d vCPUs, want the VM's 2", vcpus)
				}
				if tt.turnErr != nil {
					return nil, tt.turnErr
				}
				taken++
				return func() { released++ }, nil
			}
			if tt.noTurn {
				turn = nil
			}
			release, err := spareTurn(ctx, logrus.NewEntry(logrus.New()), turn, 2)
			if (err != nil) != tt.wantErr {
				t.Fatalf("error %v, want one: %v", err, tt.wantErr)
			}
			if err == nil {
				release()
			}
			if (taken == 1) != tt.wantTaken || released != taken {
				t.Fatalf("taken %d turns, released %d; want one taken: %v, and every one released", taken, released, tt.wantTaken)
			}
		})
	}
}

// A spare declines a task its Create would refuse whatever the VM (its spec, its configuration file) as
// spare.ErrRefused, which does not count against the spare's shape; a task of another configuration is unfit.
func TestSpareFitsRefusedTasks(t *testing.T) {
	dir := t.TempDir()
	cfgPath := filepath.Join(dir, "config.toml")
	if err := os.WriteFile(cfgPath, []byte("[hypervisor]\nvcpus = 1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	loaded, err := config.Load(cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	bundleWith := func(t *testing.T, spec specs.Spec) string {
		d := t.TempDir()
		b, err := json.Marshal(spec)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(d, "config.json"), b, 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Mkdir(filepath.Join(d, "rootfs"), 0o755); err != nil {
			t.Fatal(err)
		}
		return d
	}
	hostPID := specs.Spec{Version: specs.Version, Root: &specs.Root{Path: "rootfs"}, Process: &specs.Process{Args: []string{"sh"}, Cwd: "/"},
		Linux: &specs.Linux{Namespaces: []specs.LinuxNamespace{{Type: specs.MountNamespace}, {Type: specs.NetworkNamespace}, {Type: specs.IPCNamespace}, {Type: specs.UTSNamespace}}}}
	plain := hostPID
	plain.Linux = &specs.Linux{Namespaces: append([]specs.LinuxNamespace{{Type: specs.PIDNamespace}}, hostPID.Linux.Namespaces...)}
	other := config.Default()
	for _, tc := range []struct {
		name    string
		spare   config.Config
		cfgPath string
		bundle  string
		refused bool
		says    string
	}{
		{"a spec with the host's PID namespace", loaded, cfgPath, bundleWith(t, hostPID), true, "pid namespace"},
		{"a configuration file that does not load", loaded, filepath.Join(dir, "missing.toml"), bundleWith(t, plain), true, "missing.toml"},
		{"a bundle without a spec", loaded, cfgPath, t.TempDir(), true, "config.json"},
		{"another configuration", other, cfgPath, bundleWith(t, plain), false, "configuration differs"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sp := &Spare{cfg: tc.spare}
			err := sp.Fits(spare.Request{Dir: tc.bundle, Task: &spare.Task{ID: "c1", ConfigPath: tc.cfgPath}})
			if err == nil {
				t.Fatal("the spare fits")
			}
			if errors.Is(err, spare.ErrRefused) != tc.refused || errors.Is(err, pod.ErrUnfit) == tc.refused || !strings.Contains(err.Error(), tc.says) {
				t.Errorf("Fits = %v: refused %v, unfit %v; want refused %v, naming %q", err, errors.Is(err, spare.ErrRefused), errors.Is(err, pod.ErrUnfit), tc.refused, tc.says)
			}
		})
	}
}
