package pod

import (
	"context"
	"errors"
	"testing"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/kiln-runtime/kiln/config"
	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
)

type fakeMemoryVM struct {
	now, most int
	growErr   error
	grownTo   int
}

func (f *fakeMemoryVM) GuestMemory() (int, int) { return f.now, f.most }
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
		name     string
		vm       fakeMemoryVM
		agent    fakeMemoryAgent
		mib      int
		from, to int
		asked    uint64
		errIs    error
		wantErr  bool
	}{
		{name: "enough", vm: fakeMemoryVM{now: 512, most: 8192}, mib: 400, from: 512, to: 512},
		{name: "rounded up to a block", vm: fakeMemoryVM{now: 256, most: 8192}, mib: 600, from: 256, to: 640, asked: 640},
		{name: "to the ceiling", vm: fakeMemoryVM{now: 256, most: 1024}, mib: 1024, from: 256, to: 1024, asked: 1024},
		{name: "past the ceiling", vm: fakeMemoryVM{now: 256, most: 1024}, mib: 1025, from: 256, to: 256, errIs: errdefs.ErrInvalidArgument},
		{name: "the host refuses", vm: fakeMemoryVM{now: 256, most: 1024, growErr: errors.New("no cgroup")}, mib: 512, from: 256, to: 256, wantErr: true},
		{name: "the guest fails", vm: fakeMemoryVM{now: 256, most: 1024}, agent: fakeMemoryAgent{err: errors.New("no RAM")}, mib: 512, from: 256, to: 512, asked: 512, wantErr: true},
		{name: "the guest falls short", vm: fakeMemoryVM{now: 256, most: 1024}, agent: fakeMemoryAgent{have: 384}, mib: 512, from: 256, to: 512, asked: 512, wantErr: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			from, to, err := growMemory(context.Background(), &tc.vm, &tc.agent, tc.mib)
			if from != tc.from || to != tc.to || tc.agent.asked != tc.asked {
				t.Errorf("from %d to %d, agent asked for %d; want %d, %d, %d", from, to, tc.agent.asked, tc.from, tc.to, tc.asked)
			}
			switch {
			case tc.errIs != nil && !errors.Is(err, tc.errIs), tc.errIs == nil && tc.wantErr != (err != nil):
				t.Errorf("err %v", err)
			}
			if err == nil && tc.to > tc.from && tc.vm.grownTo != tc.to {
				t.Errorf("the VM's cgroup made room for %d MiB, want %d", tc.vm.grownTo, tc.to)
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
	}{
		{name: "enough", now: 3, most: 8, n: 2, want: 3},
		{name: "brought online", now: 2, most: 8, n: 5, want: 5, asked: 5},
		{name: "past the VM's", now: 2, most: 8, n: 9, want: 2, errIs: errdefs.ErrInvalidArgument},
		{name: "the guest fails", agent: fakeMemoryAgent{err: errors.New("no")}, now: 2, most: 8, n: 4, want: 2, asked: 4, wantErr: true},
		{name: "the guest falls short", agent: fakeMemoryAgent{have: 3}, now: 2, most: 8, n: 4, want: 2, asked: 4, wantErr: true},
		{name: "the guest claims more than the VM has", agent: fakeMemoryAgent{have: 9}, now: 2, most: 8, n: 4, want: 2, asked: 4, wantErr: true},
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
		})
	}
}

func TestLimitsOf(t *testing.T) {
	for _, tc := range []struct {
		name string
		r    *specs.LinuxResources
		want containerLimits
	}{
		{"none", nil, containerLimits{}},
		{"memory", &specs.LinuxResources{Memory: &specs.LinuxMemory{Limit: ptr(int64(100 << 20))}}, containerLimits{memory: 100 << 20}},
		{"no memory limit (-1)", &specs.LinuxResources{Memory: &specs.LinuxMemory{Limit: ptr(int64(-1))}}, containerLimits{}},
		{"CPU rounded up", &specs.LinuxResources{CPU: &specs.LinuxCPU{Quota: ptr(int64(150000)), Period: ptr(uint64(100000))}}, containerLimits{vcpus: 2}},
		{"CPU without quota (-1)", &specs.LinuxResources{CPU: &specs.LinuxCPU{Quota: ptr(int64(-1)), Period: ptr(uint64(100000))}}, containerLimits{}},
		{"a huge period", &specs.LinuxResources{CPU: &specs.LinuxCPU{Quota: ptr(int64(1)), Period: ptr(uint64(1 << 63))}}, containerLimits{vcpus: 1}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := limitsOf(tc.r); got != tc.want {
				t.Errorf("limitsOf = %+v, want %+v", got, tc.want)
			}
		})
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
