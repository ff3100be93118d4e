package pod

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/kiln-runtime/kiln/config"
	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
	"github.com/kiln-runtime/kiln/runtime/bundle"
	"github.com/kiln-runtime/kiln/runtime/sandbox"
)

type fakeMemoryVM struct {
	growErr error
	grownTo int
}

func (f *fakeMemoryVM) GrowGuestMemory(mib int) error {
	if f.growErr != nil {
		return f.growErr
	}
	f.grownTo = mib
	return nil
}

type fakeMemoryAgent struct {
	have  uint64
	err   error
	asked uint64
}

func (f *fakeMemoryAgent) AddVCPUs(_ context.Context, req *agentv1.AddVCPUsRequest) (*agentv1.AddVCPUsResponse, error) {
	f.asked = uint64(req.GetVcpus())
	if f.err != nil {
		return nil, f.err
	}
	have := uint32(f.have)
	if have == 0 {
		have = req.GetVcpus()
	}
	return &agentv1.AddVCPUsResponse{Vcpus: have}, nil
}

func (f *fakeMemoryAgent) AddMemory(_ context.Context, req *agentv1.AddMemoryRequest) (*agentv1.AddMemoryResponse, error) {
	f.asked = req.GetMemoryMib()
	if f.err != nil {
		return nil, f.err
	}
	have := f.have
	if have == 0 {
		have = req.GetMemoryMib()
	}
	return &agentv1.AddMemoryResponse{MemoryMib: have, MemoryBlockSizeMib: 128}, nil
}

func TestGrowMemory(t *testing.T) {
	for _, tc := range []struct {
		name           string
		vm             fakeMemoryVM
		agent          fakeMemoryAgent
		now, most, mib int
		want           int
		asked          uint64
		errIs          error
		wantErr        bool
		hint           bool // the error names memory_max_mib = 0, as only a guest kernel without memory hot-plug's does
	}{
		{name: "enough", now: 512, most: 8192, mib: 400, want: 512},
		{name: "rounded up to a block", now: 256, most: 8192, mib: 600, want: 640, asked: 640},
		{name: "to the ceiling", now: 256, most: 1024, mib: 1024, want: 1024, asked: 1024},
		{name: "past the ceiling", now: 256, most: 1024, mib: 1025, want: 256, errIs: errdefs.ErrInvalidArgument},
		{name: "the host refuses", vm: fakeMemoryVM{growErr: errors.New("no cgroup")}, now: 256, most: 1024, mib: 512, want: 256, wantErr: true},
		// What the guest has stays what it had: the next growth asks it again.
		{name: "the guest fails", agent: fakeMemoryAgent{err: errors.New("no RAM")}, now: 256, most: 1024, mib: 512, want: 256, asked: 512, wantErr: true},
		{name: "the guest falls short", agent: fakeMemoryAgent{have: 384}, now: 256, most: 1024, mib: 512, want: 256, asked: 512, wantErr: true},
		{name: "the guest kernel has no hot-plug", agent: fakeMemoryAgent{err: status.Error(codes.Unimplemented, "no hot-plug")}, now: 256, most: 1024, mib: 512, want: 256, asked: 512, wantErr: true, hint: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := growMemory(context.Background(), &tc.vm, &tc.agent, tc.now, tc.most, tc.mib)
			if got != tc.want || tc.agent.asked != tc.asked {
				t.Errorf("got %d, agent asked for %d; want %d, %d", got, tc.agent.asked, tc.want, tc.asked)
			}
			switch {
			case tc.errIs != nil && !errors.Is(err, tc.errIs), tc.errIs == nil && tc.wantErr != (err != nil):
				t.Errorf("err %v", err)
			}
			if hinted := strings.Contains(fmt.Sprint(err), "memory_max_mib = 0"); hinted != tc.hint {
				t.Errorf("err %v: names memory_max_mib = 0: %v, want %v", err, hinted, tc.hint)
			}
			if tc.asked > 0 && tc.vm.grownTo != int(tc.asked) {
				t.Errorf("the VM's cgroup made room for %d MiB before the guest was asked for %d", tc.vm.grownTo, tc.asked)
			}
		})
	}
}

func TestGrowVCPUs(t *testing.T) {
	for _, tc := range []struct {
		name         string
		agent        fakeMemoryAgent
		now, most, n int
		want         int
		asked        uint64
		errIs        error
		wantErr      bool
		hint         bool // the error names vcpus_max = 0, as only a guest kernel without CPU hot-plug's does
	}{
		{name: "enough", now: 3, most: 8, n: 2, want: 3},
		{name: "brought online", now: 2, most: 8, n: 5, want: 5, asked: 5},
		{name: "past the VM's", now: 2, most: 8, n: 9, want: 2, errIs: errdefs.ErrInvalidArgument},
		{name: "the guest fails", agent: fakeMemoryAgent{err: errors.New("no")}, now: 2, most: 8, n: 4, want: 2, asked: 4, wantErr: true},
		{name: "the guest falls short", agent: fakeMemoryAgent{have: 3}, now: 2, most: 8, n: 4, want: 2, asked: 4, wantErr: true},
		{name: "the guest claims more than the VM has", agent: fakeMemoryAgent{have: 9}, now: 2, most: 8, n: 4, want: 2, asked: 4, wantErr: true},
		{name: "the guest kernel has no hot-plug", agent: fakeMemoryAgent{err: status.Error(codes.Unimplemented, "no hot-plug")}, now: 2, most: 8, n: 4, want: 2, asked: 4, wantErr: true, hint: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := growVCPUs(context.Background(), &tc.agent, tc.now, tc.most, tc.n)
			if got != tc.want || tc.agent.asked != tc.asked {
				t.Errorf("got %d, agent asked for %d; want %d, %d", got, tc.agent.asked, tc.want, tc.asked)
			}
			switch {
			case tc.errIs != nil && !errors.Is(err, tc.errIs), tc.errIs == nil && tc.wantErr != (err != nil):
				t.Errorf("err %v", err)
			}
			if hinted := strings.Contains(fmt.Sprint(err), "vcpus_max = 0"); hinted != tc.hint {
				t.Errorf("err %v: names vcpus_max = 0: %v, want %v", err, hinted, tc.hint)
			}
		})
	}
}

func TestLimitsOf(t *testing.T) {
	old := containerLimits{memory: 64 << 20, quota: 50000, period: 100000}
	for _, tc := range []struct {
		name  string
		r     *specs.LinuxResources
		want  containerLimits
		milli int64
	}{
		{"none", nil, old, 500},
		{"memory", &specs.LinuxResources{Memory: &specs.LinuxMemory{Limit: ptr(int64(100 << 20))}}, containerLimits{memory: 100 << 20, quota: 50000, period: 100000}, 500},
		{"no memory limit (-1)", &specs.LinuxResources{Memory: &specs.LinuxMemory{Limit: ptr(int64(-1))}}, containerLimits{quota: 50000, period: 100000}, 500},
		{"a memory limit of 0 leaves it", &specs.LinuxResources{Memory: &specs.LinuxMemory{Limit: ptr(int64(0))}}, old, 500},
		{"CPU rounded up to a thousandth", &specs.LinuxResources{CPU: &specs.LinuxCPU{Quota: ptr(int64(150001)), Period: ptr(uint64(100000))}}, containerLimits{memory: 64 << 20, quota: 150001, period: 100000}, 1501},
		{"a quota alone keeps the period", &specs.LinuxResources{CPU: &specs.LinuxCPU{Quota: ptr(int64(200000))}}, containerLimits{memory: 64 << 20, quota: 200000, period: 100000}, 2000},
		{"a period alone keeps the quota", &specs.LinuxResources{CPU: &specs.LinuxCPU{Period: ptr(uint64(50000))}}, containerLimits{memory: 64 << 20, quota: 50000, period: 50000}, 1000},
		{"no CPU quota (-1)", &specs.LinuxResources{CPU: &specs.LinuxCPU{Quota: ptr(int64(-1))}}, containerLimits{memory: 64 << 20, period: 100000}, 0},
		{"shares only", &specs.LinuxResources{CPU: &specs.LinuxCPU{Shares: ptr(uint64(512))}}, old, 500},
		{"a huge period", &specs.LinuxResources{CPU: &specs.LinuxCPU{Period: ptr(uint64(1 << 63))}}, containerLimits{memory: 64 << 20, quota: 50000, period: 1 << 40}, 1},
		{"a huge quota", &specs.LinuxResources{CPU: &specs.LinuxCPU{Quota: ptr(int64(1 << 62))}}, containerLimits{memory: 64 << 20, quota: 1 << 62, period: 100000}, (1<<40)/100 + 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := limitsOf(tc.r, old)
			if got != tc.want || got.milliCPUs() != tc.milli {
				t.Errorf("limitsOf = %+v (%d milliCPUs), want %+v (%d)", got, got.milliCPUs(), tc.want, tc.milli)
			}
		})
	}
	// A quota without a period at a create has the kernel's.
	if got := limitsOf(&specs.LinuxResources{CPU: &specs.LinuxCPU{Quota: ptr(int64(150000))}}, containerLimits{}).milliCPUs(); got != 1500 {
		t.Errorf("a quota of 150000 without a period: %d milliCPUs, want 1500", got)
	}
}

func TestSameMachine(t *testing.T) {
	base := config.Default()
	spare := base
	sized := func(limitMiB int) config.Config {
		c := base
		c.Hypervisor.BootMemoryMiB = c.Hypervisor.MemoryMiB
		c.Hypervisor.MemoryMiB += limitMiB
		return c
	}
	noGrowth := func(c config.Config) config.Config { c.Hypervisor.MemoryMaxMiB, c.Hypervisor.VCPUsMax = 0, 0; return c }
	withCPUs := func(c config.Config, n int) config.Config {
		c.Hypervisor.BootVCPUs = c.Hypervisor.VCPUs
		c.Hypervisor.VCPUs += n
		return c
	}
	otherBootCPUs := sized(512)
	otherBootCPUs.Hypervisor.VCPUs++
	for _, tc := range []struct {
		name       string
		want, have config.Config
		same       bool
	}{
		{"no limit", sized(0), spare, true},
		{"a limit the VM grows to", sized(1024), spare, true},
		{"a limit past the ceiling", sized(base.Hypervisor.MemoryMaxMiB), spare, false},
		{"a CPU limit the VM grows to", withCPUs(sized(512), 2), spare, true},
		{"a CPU limit past the VM's vCPUs", withCPUs(sized(512), base.Hypervisor.VCPUsMax), spare, false},
		{"another vCPU count to boot with", otherBootCPUs, spare, false},
		{"a CPU limit on a VM that cannot grow", withCPUs(noGrowth(sized(0)), 1), noGrowth(spare), false},
		{"a VM that cannot grow", noGrowth(sized(512)), noGrowth(spare), false},
		{"a VM that cannot grow, same size", noGrowth(sized(0)), noGrowth(spare), true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := sameMachine(tc.want, tc.have); got != tc.same {
				t.Errorf("sameMachine = %v, want %v", got, tc.same)
			}
		})
	}
}

// fit adds up its containers' CPU limits before it rounds up (seven of 100m need one vCPU beyond the VM's own,
// not seven), and an update changes only the limits it names. The VM here has what they need already: fit asks
// nothing of it.
func TestFitLimits(t *testing.T) {
	cfg := config.Default()
	cfg.Hypervisor.BootVCPUs, cfg.Hypervisor.BootMemoryMiB = cfg.Hypervisor.VCPUs, cfg.Hypervisor.MemoryMiB
	p := &Pod{cfg: cfg, vcpus: cfg.Hypervisor.VCPUs + 1, memMiB: 4096, bundles: map[string]*bundle.Bundle{}}
	ctx := context.Background()
	for i := range 7 {
		p.bundles[fmt.Sprint("c", i)] = &bundle.Bundle{}
	}
	cpu := func(milli int64) *specs.LinuxResources {
		return &specs.LinuxResources{CPU: &specs.LinuxCPU{Quota: ptr(milli * 100), Period: ptr(uint64(100000))}}
	}
	for i := range 7 {
		if err := p.Fit(ctx, fmt.Sprint("c", i), cpu(100), false); err != nil {
			t.Fatalf("container %d of 100m: %v", i, err)
		}
	}
	mem := &specs.LinuxResources{Memory: &specs.LinuxMemory{Limit: ptr(int64(512 << 20))}, CPU: &specs.LinuxCPU{Quota: ptr(int64(20000)), Period: ptr(uint64(100000))}}
	if err := p.Fit(ctx, "c0", mem, false); err != nil {
		t.Fatal(err)
	}
	if err := p.Fit(ctx, "c0", cpu(300), true); err != nil {
		t.Fatal(err)
	}
	if got, want := p.limits["c0"], (containerLimits{memory: 512 << 20, quota: 30000, period: 100000}); got != want {
		t.Errorf("after a CPU-only update: %+v, want %+v", got, want)
	}
	p.forget("c0")
	if _, ok := p.limits["c0"]; ok || len(p.limits) != 6 {
		t.Errorf("after forget: %v", p.limits)
	}
	// An update that comes after its container's delete took the bundle (DeleteContainer) records nothing.
	delete(p.bundles, "c1")
	p.forget("c1")
	if err := p.Fit(ctx, "c1", mem, true); !errdefs.IsNotFound(err) {
		t.Errorf("an update of a deleted container: %v, want NotFound", err)
	}
	if _, ok := p.limits["c1"]; ok {
		t.Errorf("an update of a deleted container recorded %+v", p.limits["c1"])
	}
}

// fakeUpdater is a container whose guest applies resources, or fails to.
type fakeUpdater struct {
	id  string
	err error
	// during runs as the guest applies them (another update meanwhile).
	during func()
}

func (f fakeUpdater) ID() string { return f.id }
func (f fakeUpdater) Update(context.Context, *specs.LinuxResources) error {
	if f.during != nil {
		f.during()
	}
	return f.err
}

// Limits the guest did not apply are not counted: the pod keeps what the container had, unless an update that
// came meanwhile changed it.
func TestUpdateTheGuestRefusesIsNotCounted(t *testing.T) {
	cfg := config.Default()
	cfg.Hypervisor.BootVCPUs, cfg.Hypervisor.BootMemoryMiB = cfg.Hypervisor.VCPUs, cfg.Hypervisor.MemoryMiB
	ctx := context.Background()
	mem := func(mib int64) *specs.LinuxResources {
		return &specs.LinuxResources{Memory: &specs.LinuxMemory{Limit: ptr(mib << 20)}}
	}
	refused := errors.New("update container c0: the guest refused")
	for _, tc := range []struct {
		name string
		// first is c0's limit when it was created (0: none), update the limit the guest refuses.
		first, update int64
		// during, when set, is another update's limit applied while the refused one is out.
		during int64
		want   int64
	}{
		{"a lower limit", 512, 128, 0, 512},
		{"a higher limit", 128, 512, 0, 128},
		{"a first limit", 0, 256, 0, 0},
		{"another update meanwhile", 512, 128, 256, 256},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := &Pod{cfg: cfg, vcpus: cfg.Hypervisor.VCPUs, memMiB: 4096, bundles: map[string]*bundle.Bundle{"c0": {}}}
			if tc.first > 0 {
				if err := p.Fit(ctx, "c0", mem(tc.first), false); err != nil {
					t.Fatal(err)
				}
			}
			c := fakeUpdater{id: "c0", err: refused}
			if tc.during > 0 {
				c.during = func() {
					if err := p.Update(ctx, fakeUpdater{id: "c0"}, mem(tc.during)); err != nil {
						t.Error(err)
					}
				}
			}
			if err := p.Update(ctx, c, mem(tc.update)); !errors.Is(err, refused) {
				t.Fatalf("Update: %v, want the guest's error", err)
			}
			got, counted := p.limits["c0"]
			if counted != (tc.want > 0) || got.memory != tc.want<<20 {
				t.Errorf("the pod counts %+v (%v), want a memory limit of %d MiB", got, counted, tc.want)
			}
		})
	}
	// An update the guest applies is counted.
	p := &Pod{cfg: cfg, vcpus: cfg.Hypervisor.VCPUs, memMiB: 4096, bundles: map[string]*bundle.Bundle{"c0": {}}}
	if err := p.Update(ctx, fakeUpdater{id: "c0"}, mem(300)); err != nil || p.limits["c0"].memory != 300<<20 {
		t.Errorf("an applied update: %v, counted %+v", err, p.limits["c0"])
	}
}

// A first container whose limits its pod cannot fit after all, when its create hooks already ran (the pod booted,
// or adopted a spare, for it: nerdctl's CNI ADD leased an address), is no refusal before its hooks: FailedCreate
// runs its poststop hooks (the DEL), which a refusal skips.
func TestFirstContainerUnfitAfterItsHooks(t *testing.T) {
	limit := int64(1 << 30)
	spec := &specs.Spec{Linux: &specs.Linux{Resources: &specs.LinuxResources{Memory: &specs.LinuxMemory{Limit: &limit}}},
		Hooks: &specs.Hooks{CreateRuntime: []specs.Hook{{Path: "/bin/true"}}}}
	b := &bundle.Bundle{Spec: spec}
	// A VM of 256 MiB that cannot grow (as one booted before its pod knew the container's limit, a spare's).
	cfg := config.Default()
	cfg.Hypervisor.MemoryMaxMiB, cfg.Hypervisor.VCPUsMax = 0, 0
	p := &Pod{cfg: cfg, sb: &sandbox.Sandbox{}, vcpus: cfg.Hypervisor.VCPUs, bundles: map[string]*bundle.Bundle{},
		net: &hostNetwork{hooksRun: "c"}}
	err := p.prepareContainer(context.Background(), "c", b)
	if err == nil {
		t.Fatal("a VM of 256 MiB that cannot grow took a container limited to 1 GiB")
	}
	if Refused(err) {
		t.Errorf("prepareContainer = %v, a refusal: the poststop hooks of a container whose create hooks ran would be skipped", err)
	}
}
