package container

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/cgroups"
	"github.com/opencontainers/cgroups/devices/config"
	"github.com/opencontainers/runc/libcontainer/configs"
	"github.com/opencontainers/runc/libcontainer/specconv"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/kiln-runtime/kiln/proto/features"
)

func TestRootfsPath(t *testing.T) {
	tests := []struct {
		rootfs, want string
		ok           bool
	}{
		{"c1/rootfs", "/share/c1/rootfs", true},
		{"c1/./rootfs/", "/share/c1/rootfs", true},
		{"c1/../c2/rootfs", "/share/c2/rootfs", true},
		{"", "", false},
		{"/c1/rootfs", "", false},
		{"..", "", false},
		{"../etc", "", false},
		{"c1/../../etc", "", false},
		{".", "", false},
	}
	for _, tt := range tests {
		got, err := rootfsPath("/share", tt.rootfs)
		if (err == nil) != tt.ok || got != tt.want {
			t.Errorf("rootfsPath(%q) = %q, %v; want %q ok=%v", tt.rootfs, got, err, tt.want, tt.ok)
		}
	}
}

func TestGuestCgroupPath(t *testing.T) {
	tests := []struct{ in, want string }{
		{"", "/kiln/c1"},
		{"/default/c1", "/kiln/default/c1"},
		{"/a/../b", "/kiln/b"},
		{"/../../b", "/kiln/b"},
		{"relative/path", "/kiln/c1"},
		{"system.slice:cri-containerd:c1", "/kiln/c1"},
		{"/", "/kiln/c1"},
	}
	for _, tt := range tests {
		if got := guestCgroupPath(tt.in, "c1"); got != tt.want {
			t.Errorf("guestCgroupPath(%q) = %q, want %q", tt.in, got, tt.want)
		}
	}
}

func exampleSpec(t *testing.T, mutate func(*specs.Spec)) []byte {
	t.Helper()
	s := specconv.Example()
	s.Root.Path = "/host/bundle/rootfs"
	s.Hooks = &specs.Hooks{CreateRuntime: []specs.Hook{{Path: "/usr/bin/host-only"}}}
	s.Linux.CgroupsPath = "kubepods.slice:cri:c1"
	s.Linux.Namespaces = append(s.Linux.Namespaces, specs.LinuxNamespace{Type: specs.NetworkNamespace, Path: "/var/run/netns/x"})
	if mutate != nil {
		mutate(s)
	}
	b, err := json.Marshal(s)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestAdaptSpec(t *testing.T) {
	spec, err := adaptSpec(exampleSpec(t, nil), "c1", "/run/kiln/shared/c1/rootfs", testPod)
	if err != nil {
		t.Fatal(err)
	}
	if spec.Root.Path != "/run/kiln/shared/c1/rootfs" {
		t.Errorf("root %q", spec.Root.Path)
	}
	if spec.Hooks != nil {
		t.Errorf("hooks kept: %v", spec.Hooks)
	}
	if !slices.Contains(spec.Linux.Namespaces, specs.LinuxNamespace{Type: specs.NetworkNamespace, Path: testPod.net}) ||
		slices.Contains(spec.Linux.Namespaces, specs.LinuxNamespace{Type: specs.NetworkNamespace, Path: "/var/run/netns/x"}) {
		t.Errorf("network namespace is not the pod's: %v", spec.Linux.Namespaces)
	}
	if !slices.ContainsFunc(spec.Linux.Namespaces, func(ns specs.LinuxNamespace) bool { return ns.Type == specs.PIDNamespace }) {
		t.Errorf("pid namespace dropped: %v", spec.Linux.Namespaces)
	}
	if spec.Linux.CgroupsPath != "/kiln/c1" {
		t.Errorf("cgroups path %q", spec.Linux.CgroupsPath)
	}

	cfg, err := libcontainerConfig(spec, "c1", true)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Rootfs != "/run/kiln/shared/c1/rootfs" || !cfg.NoPivotRoot {
		t.Errorf("rootfs %q no-pivot %v", cfg.Rootfs, cfg.NoPivotRoot)
	}
	if cfg.Namespaces.PathOf(configs.NEWNET) != testPod.net {
		t.Errorf("libcontainer config's network namespace is %q", cfg.Namespaces.PathOf(configs.NEWNET))
	}
	if !cfg.Namespaces.Contains(configs.NEWPID) || !cfg.Namespaces.Contains(configs.NEWNS) {
		t.Error("libcontainer config lost pid or mount namespace")
	}
	if cfg.Cgroups.Path != "/kiln/c1" {
		t.Errorf("cgroup path %q", cfg.Cgroups.Path)
	}
}

func TestAdaptSpecRejects(t *testing.T) {
	for name, raw := range map[string][]byte{
		"not json":   []byte("{"),
		"no process": []byte(`{"ociVersion":"1.2.0","root":{"path":"rootfs"}}`),
	} {
		if _, err := adaptSpec(raw, "c1", "/r", testPod); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

// testPod has its network namespace at /run/kiln/netns/pod and one container, whose init is pid 7.
var testPod = podNamespaces{net: "/run/kiln/netns/pod", isInit: func(pid int) bool { return pid == 7 }}

func TestAdaptSpecNamespaces(t *testing.T) {
	for _, tc := range []struct {
		name string
		ns   []specs.LinuxNamespace
		ok   bool
	}{
		{"new namespaces", []specs.LinuxNamespace{{Type: specs.PIDNamespace}, {Type: specs.IPCNamespace}}, true},
		{"no network namespace", []specs.LinuxNamespace{{Type: specs.MountNamespace}}, true},
		{"CRI app container", []specs.LinuxNamespace{
			{Type: specs.NetworkNamespace, Path: "/proc/7/ns/net"}, {Type: specs.IPCNamespace, Path: "/proc/7/ns/ipc"},
			{Type: specs.UTSNamespace, Path: "/proc/7/ns/uts"}, {Type: specs.PIDNamespace, Path: "/proc/7/ns/pid"},
		}, true},
		{"pid of no container", []specs.LinuxNamespace{{Type: specs.IPCNamespace, Path: "/proc/8/ns/ipc"}}, false},
		{"type mismatch", []specs.LinuxNamespace{{Type: specs.IPCNamespace, Path: "/proc/7/ns/uts"}}, false},
		{"host path", []specs.LinuxNamespace{{Type: specs.UTSNamespace, Path: "/var/run/utsns/x"}}, false},
		{"traversal", []specs.LinuxNamespace{{Type: specs.IPCNamespace, Path: "/proc/7/../1/ns/ipc"}}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			raw := exampleSpec(t, func(s *specs.Spec) { s.Linux.Namespaces = tc.ns })
			spec, err := adaptSpec(raw, "c1", "/r", testPod)
			if (err == nil) != tc.ok {
				t.Fatalf("err = %v, want ok %v", err, tc.ok)
			}
			if err != nil {
				return
			}
			var nets []specs.LinuxNamespace
			for _, n := range spec.Linux.Namespaces {
				if n.Type == specs.NetworkNamespace {
					nets = append(nets, n)
				}
			}
			if len(nets) != 1 || nets[0].Path != testPod.net {
				t.Errorf("network namespaces %v, want only the pod's", nets)
			}
		})
	}
}

func TestNewProcess(t *testing.T) {
	rootfs := t.TempDir()
	if err := os.MkdirAll(filepath.Join(rootfs, "etc"), 0o755); err != nil {
		t.Fatal(err)
	}
	write := func(name, text string) {
		if err := os.WriteFile(filepath.Join(rootfs, "etc", name), []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("passwd", "root:x:0:0::/root:/bin/sh\nalice:x:1000:1001::/home/alice:/bin/sh\n")
	write("group", "root:x:0:\nalice:x:1001:\nstaff:x:50:alice,bob\nwheel:x:10:bob\n")

	p := &specs.Process{
		Args: []string{"id"}, Cwd: "/",
		User:            specs.User{UID: 7, GID: 8, AdditionalGids: []uint32{9}},
		NoNewPrivileges: true,
		Rlimits:         []specs.POSIXRlimit{{Type: "RLIMIT_NOFILE", Hard: 100, Soft: 50}},
		ConsoleSize:     &specs.Box{Height: 24, Width: 80},
		Capabilities:    &specs.LinuxCapabilities{Bounding: []string{"CAP_KILL"}},
	}
	lp, err := newProcess(p, rootfs)
	if err != nil {
		t.Fatal(err)
	}
	if lp.UID != 7 || lp.GID != 8 || !slices.Equal(lp.AdditionalGroups, []int{9}) {
		t.Errorf("numeric user: uid %d gid %d groups %v", lp.UID, lp.GID, lp.AdditionalGroups)
	}
	if lp.NoNewPrivileges == nil || !*lp.NoNewPrivileges || lp.ConsoleWidth != 80 || lp.ConsoleHeight != 24 {
		t.Errorf("no-new-privs %v console %dx%d", lp.NoNewPrivileges, lp.ConsoleWidth, lp.ConsoleHeight)
	}
	if len(lp.Rlimits) != 1 || lp.Rlimits[0] != (configs.Rlimit{Type: unix.RLIMIT_NOFILE, Hard: 100, Soft: 50}) {
		t.Errorf("rlimits %v", lp.Rlimits)
	}
	if lp.Capabilities == nil || !slices.Equal(lp.Capabilities.Bounding, []string{"CAP_KILL"}) {
		t.Errorf("capabilities %v", lp.Capabilities)
	}

	p.User = specs.User{Username: "alice", AdditionalGids: []uint32{50, 99}}
	lp, err = newProcess(p, rootfs)
	if err != nil {
		t.Fatal(err)
	}
	if lp.UID != 1000 || lp.GID != 1001 || !slices.Equal(lp.AdditionalGroups, []int{50, 99}) {
		t.Errorf("named user: uid %d gid %d groups %v, want 1000 1001 [50 99]", lp.UID, lp.GID, lp.AdditionalGroups)
	}

	p.User = specs.User{Username: "nobody-here"}
	if _, err := newProcess(p, rootfs); err == nil {
		t.Error("unknown user name accepted")
	}
	p.User = specs.User{}
	p.Rlimits = []specs.POSIXRlimit{{Type: "RLIMIT_BOGUS"}}
	if _, err := newProcess(p, rootfs); err == nil {
		t.Error("unknown rlimit accepted")
	}
}

// /etc/passwd is looked up inside the rootfs even through an absolute
// symlink, never in the guest's own files.
func TestLookupUserStaysInRootfs(t *testing.T) {
	rootfs := t.TempDir()
	if err := os.MkdirAll(filepath.Join(rootfs, "etc", "real"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(rootfs, "etc", "real", "passwd"), []byte("carol:x:42:42::/:/bin/sh\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("/etc/real/passwd", filepath.Join(rootfs, "etc", "passwd")); err != nil {
		t.Fatal(err)
	}
	u, err := lookupUser(rootfs, "carol")
	if err != nil || u.Uid != 42 {
		t.Fatalf("lookup through an absolute symlink: %v %v", u, err)
	}
	// A FIFO in its place (a running container's doing) is refused, not opened and waited on.
	if err := os.Remove(filepath.Join(rootfs, "etc", "real", "passwd")); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mkfifo(filepath.Join(rootfs, "etc", "real", "passwd"), 0o644); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { _, err := lookupUser(rootfs, "carol"); done <- err }()
	select {
	case err := <-done:
		if err == nil || !strings.Contains(err.Error(), "not a regular file") {
			t.Errorf("lookup in a FIFO: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("lookup waits on a FIFO")
	}
}

// An update changes what it names and keeps everything else (device rules
// above all).
func TestMergeResources(t *testing.T) {
	limit, quota, pids := int64(64<<20), int64(50000), int64(10)
	period := uint64(100000)
	oldPids := int64(3)
	cur := &cgroups.Resources{Memory: 1, CpuQuota: 2, PidsLimit: &oldPids, CpusetCpus: "0", Unified: map[string]string{"a": "1"},
		HugetlbLimit: []*cgroups.HugepageLimit{{Pagesize: "2MB", Limit: 4 << 20}}}
	cur.Devices = make([]*config.Rule, 2)
	check := true
	dst := mergeResources(cur, &specs.LinuxResources{
		Memory:         &specs.LinuxMemory{Limit: &limit, CheckBeforeUpdate: &check},
		CPU:            &specs.LinuxCPU{Quota: &quota, Period: &period},
		Pids:           &specs.LinuxPids{Limit: &pids},
		Unified:        map[string]string{"b": "2"},
		HugepageLimits: []specs.LinuxHugepageLimit{{Pagesize: "2MB", Limit: 8 << 20}},
	})
	// The live resources the merge started from are libcontainer's to restore when the update fails.
	if cur.Memory != 1 || *cur.PidsLimit != oldPids || len(cur.Unified) != 1 || cur.HugetlbLimit[0].Limit != 4<<20 {
		t.Errorf("the merge changed the resources it started from: %+v (hugetlb %+v)", cur, cur.HugetlbLimit[0])
	}
	if dst.HugetlbLimit[0].Limit != 8<<20 {
		t.Errorf("merged hugetlb limit %+v, want 8 MiB", dst.HugetlbLimit[0])
	}
	if dst.Memory != limit || dst.CpuQuota != quota || dst.CpuPeriod != period || dst.PidsLimit == nil || *dst.PidsLimit != pids || !dst.MemoryCheckBeforeUpdate {
		t.Errorf("merged: memory %d (check before update %v) quota %d period %d pids %v", dst.Memory, dst.MemoryCheckBeforeUpdate, dst.CpuQuota, dst.CpuPeriod, dst.PidsLimit)
	}
	// A pids section without a limit keeps the limit there is.
	dst = mergeResources(dst, &specs.LinuxResources{Pids: &specs.LinuxPids{}})
	if dst.PidsLimit == nil || *dst.PidsLimit != pids {
		t.Errorf("pids limit after an update without one: %v, want %d", dst.PidsLimit, pids)
	}
	if dst.CpusetCpus != "0" || len(dst.Devices) != 2 || dst.Unified["a"] != "1" || dst.Unified["b"] != "2" {
		t.Errorf("fields the update did not name changed: %+v", dst)
	}
	// A CPU request's update (an in-place resize) reaches cgroup v2's cpu.weight, which libcontainer writes from
	// CpuWeight alone: 2048 shares are weight 174 there, as runc's update computes it.
	shares := uint64(2048)
	dst = mergeResources(dst, &specs.LinuxResources{CPU: &specs.LinuxCPU{Shares: &shares}})
	if dst.CpuShares != shares || dst.CpuWeight != 174 {
		t.Errorf("after an update of the shares to %d: shares %d, weight %d", shares, dst.CpuShares, dst.CpuWeight)
	}
	// The freezer is Pause's and Resume's: an update leaves a paused container paused, a running one running.
	dst.Freezer = cgroups.Frozen
	if got := mergeResources(dst, &specs.LinuxResources{}).Freezer; got != cgroups.Undefined {
		t.Errorf("an update writes the freezer state %q", got)
	}
	// No memory limit any more: no swap limit either, as runc's update makes it.
	dst.Memory, dst.MemorySwap = 1<<30, 1<<30
	unlimited := int64(-1)
	if got := mergeResources(dst, &specs.LinuxResources{Memory: &specs.LinuxMemory{Limit: &unlimited}}); got.Memory != -1 || got.MemorySwap != 0 {
		t.Errorf("memory limit lifted: memory %d swap %d, want -1 and 0", got.Memory, got.MemorySwap)
	}
	swap := int64(2 << 30)
	if got := mergeResources(dst, &specs.LinuxResources{Memory: &specs.LinuxMemory{Limit: &unlimited, Swap: &swap}}); got.MemorySwap != swap {
		t.Errorf("memory limit lifted with a swap limit: swap %d", got.MemorySwap)
	}
	// An idle cgroup has no weight.
	idle := int64(1)
	if got := mergeResources(dst, &specs.LinuxResources{CPU: &specs.LinuxCPU{Idle: &idle}}); got.CpuWeight != 0 || got.CpuShares != 0 || got.CPUIdle == nil || *got.CPUIdle != 1 {
		t.Errorf("cpu.idle=1: shares %d weight %d idle %v", got.CpuShares, got.CpuWeight, got.CPUIdle)
	}
}

// Kiln reports libcontainer's mount options and namespaces as its own (proto/features): they must be the ones
// of the libcontainer the agent links.
func TestFeaturesMatchLibcontainer(t *testing.T) {
	want := specconv.KnownMountOptions()
	slices.Sort(want)
	got := features.MountOptions()
	slices.Sort(got)
	if !slices.Equal(got, want) {
		t.Errorf("proto/features mount options\n%q\nlibcontainer's\n%q", got, want)
	}
	wantNS := specconv.KnownNamespaces()
	slices.Sort(wantNS)
	gotNS := features.Namespaces()
	slices.Sort(gotNS)
	if !slices.Equal(gotNS, wantNS) {
		t.Errorf("proto/features namespaces %q, libcontainer's %q", gotNS, wantNS)
	}
}

// A container with a user namespace gets the pod's sysfs (the agent's, mounted in the pod namespace) bound
// instead of a sysfs it could not mount, and its net.* sysctls go to the agent; one without keeps both, and no pod
// sysfs is made for it.
func TestFitUserNamespace(t *testing.T) {
	for _, userns := range []bool{false, true} {
		spec := &specs.Spec{
			Linux: &specs.Linux{Sysctl: map[string]string{"net.ipv4.ip_unprivileged_port_start": "0", "kernel.msgmax": "8192"}},
			Mounts: []specs.Mount{
				{Destination: "/proc", Type: "proc", Source: "proc"},
				{Destination: "/sys", Type: "sysfs", Source: "sysfs", Options: []string{"nosuid", "noexec", "nodev", "ro"}},
			},
		}
		if userns {
			spec.Linux.Namespaces = []specs.LinuxNamespace{{Type: specs.UserNamespace}}
		}
		asked := 0
		net, err := fitUserNamespace(spec, func() (string, error) { asked++; return "/run/kiln/netns/pod.sys", nil })
		if err != nil {
			t.Fatal(err)
		}
		sys := spec.Mounts[1]
		if !userns {
			if net != nil || sys.Type != "sysfs" || len(spec.Linux.Sysctl) != 2 || asked != 0 {
				t.Errorf("without a user namespace: sysctls %v taken, %v left, sys mount %+v", net, spec.Linux.Sysctl, sys)
			}
			continue
		}
		if len(net) != 1 || net["net.ipv4.ip_unprivileged_port_start"] != "0" || len(spec.Linux.Sysctl) != 1 || spec.Linux.Sysctl["kernel.msgmax"] != "8192" {
			t.Errorf("with a user namespace: sysctls %v taken, %v left", net, spec.Linux.Sysctl)
		}
		want := specs.Mount{Destination: "/sys", Type: "bind", Source: "/run/kiln/netns/pod.sys", Options: []string{"rbind", "nosuid", "noexec", "nodev", "ro"}}
		if !slices.Equal(sys.Options, want.Options) || sys.Type != want.Type || sys.Source != want.Source || sys.Destination != want.Destination {
			t.Errorf("sys mount %+v, want %+v", sys, want)
		}
		if spec.Mounts[0].Type != "proc" {
			t.Errorf("proc mount changed: %+v", spec.Mounts[0])
		}
	}
	// A pod sysfs that cannot be made fails the container.
	spec := &specs.Spec{Linux: &specs.Linux{Namespaces: []specs.LinuxNamespace{{Type: specs.UserNamespace}}},
		Mounts: []specs.Mount{{Destination: "/sys", Type: "sysfs", Source: "sysfs"}}}
	if _, err := fitUserNamespace(spec, func() (string, error) { return "", errors.New("no mount") }); err == nil {
		t.Error("no error without a pod sysfs")
	}
}

// Limits of 0 huge pages of a size the guest lacks go (kubelet's 1 GiB limit, under TCG's CPU model); every
// limit of a size it has, and any limit that allows pages, stays.
func TestGuestHugepages(t *testing.T) {
	have := []string{"2MB"}
	in := []specs.LinuxHugepageLimit{{Pagesize: "2MB", Limit: 0}, {Pagesize: "1GB", Limit: 0}, {Pagesize: "1GB", Limit: 1 << 30}, {Pagesize: "2MB", Limit: 4 << 20}}
	want := []specs.LinuxHugepageLimit{{Pagesize: "2MB", Limit: 0}, {Pagesize: "1GB", Limit: 1 << 30}, {Pagesize: "2MB", Limit: 4 << 20}}
	if got := guestHugepages(in, have); !slices.Equal(got, want) {
		t.Errorf("guestHugepages = %+v, want %+v", got, want)
	}
	if got := guestHugepages(nil, have); got != nil {
		t.Errorf("no limits became %+v", got)
	}
}

// A container of a spec without a cgroup namespace (made on a cgroup v1 host) gets one, as containerd gives it on
// a v2 host, unless it is privileged; a privileged one keeps the guest's, and its cgroup mounts keep the
// hierarchy's nsdelegate, which a mount without it from the initial namespace would take off for the whole guest.
func TestFitCgroupNamespace(t *testing.T) {
	cgroupMount := specs.Mount{Destination: "/sys/fs/cgroup", Type: "cgroup", Source: "cgroup", Options: []string{"nosuid", "noexec", "nodev", "relatime", "ro"}}
	for _, tc := range []struct {
		name       string
		ns         []specs.LinuxNamespace
		caps       []string
		wantNS     bool
		wantOption bool
	}{
		{"unprivileged", []specs.LinuxNamespace{{Type: specs.PIDNamespace}}, []string{"CAP_CHOWN", "CAP_KILL"}, true, false},
		{"no capabilities", []specs.LinuxNamespace{{Type: specs.PIDNamespace}}, nil, true, false},
		{"privileged", []specs.LinuxNamespace{{Type: specs.PIDNamespace}}, []string{"CAP_CHOWN", "CAP_SYS_ADMIN"}, false, true},
		{"CAP_SYS_ADMIN alone", []specs.LinuxNamespace{{Type: specs.PIDNamespace}}, []string{"CAP_SYS_ADMIN"}, true, false},
		{"own namespace already", []specs.LinuxNamespace{{Type: specs.CgroupNamespace}}, []string{"CAP_SYS_ADMIN"}, true, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cgroupMount := cgroupMount
			raw := exampleSpec(t, func(s *specs.Spec) {
				s.Linux.Namespaces = tc.ns
				if tc.wantOption {
					// containerd's privileged: no masked or read-only paths, and the host's cgroup2 options.
					s.Linux.MaskedPaths, s.Linux.ReadonlyPaths = nil, nil
					cgroupMount.Options = append(slices.Clone(cgroupMount.Options), "memory_recursiveprot", "memory_localevents")
				}
				s.Process.Capabilities = nil
				if tc.caps != nil {
					s.Process.Capabilities = &specs.LinuxCapabilities{Bounding: tc.caps, Effective: tc.caps, Permitted: tc.caps}
				}
				s.Mounts = slices.DeleteFunc(s.Mounts, func(m specs.Mount) bool { return m.Destination == "/sys/fs/cgroup" })
				s.Mounts = append(s.Mounts, cgroupMount)
			})
			spec, err := adaptSpec(raw, "c1", "/r", testPod)
			if err != nil {
				t.Fatal(err)
			}
			gotNS := slices.ContainsFunc(spec.Linux.Namespaces, func(n specs.LinuxNamespace) bool { return n.Type == specs.CgroupNamespace })
			if gotNS != tc.wantNS {
				t.Errorf("cgroup namespace %v, want %v: %v", gotNS, tc.wantNS, spec.Linux.Namespaces)
			}
			i := slices.IndexFunc(spec.Mounts, func(m specs.Mount) bool { return m.Destination == "/sys/fs/cgroup" })
			if got := slices.Contains(spec.Mounts[i].Options, "nsdelegate"); got != tc.wantOption {
				t.Errorf("cgroup mount options %v: nsdelegate %v, want %v", spec.Mounts[i].Options, got, tc.wantOption)
			}
			if slices.Contains(spec.Mounts[i].Options, "memory_recursiveprot") || slices.Contains(spec.Mounts[i].Options, "memory_localevents") {
				t.Errorf("cgroup mount options %v: a flag of the host's hierarchy would become the guest's", spec.Mounts[i].Options)
			}
			if _, err := libcontainerConfig(spec, "c1", true); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// A directory on the way to the user database that a running container keeps swapping for a symlink out of its
// root is resolved inside the root every time: the lookup never reads the guest's files (or another container's).
func TestLookupUserRacesASwappedDirectory(t *testing.T) {
	outside := t.TempDir()
	if err := os.WriteFile(filepath.Join(outside, "passwd"), []byte("mallory:x:7:7::/:/bin/sh\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	rootfs := t.TempDir()
	etc, link := filepath.Join(rootfs, "etc"), filepath.Join(rootfs, "etc.link")
	if err := os.MkdirAll(etc, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(etc, "passwd"), []byte("carol:x:42:42::/:/bin/sh\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(outside, link); err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	swapped := make(chan struct{})
	go func() {
		defer close(swapped)
		for {
			select {
			case <-stop:
				return
			default:
			}
			// etc is the directory and the symlink out in turns, each swap atomic.
			if err := unix.Renameat2(unix.AT_FDCWD, etc, unix.AT_FDCWD, link, unix.RENAME_EXCHANGE); err != nil {
				t.Errorf("swap: %v", err)
				return
			}
		}
	}()
	defer func() { close(stop); <-swapped }()
	found := 0
	for range 3000 {
		if u, err := lookupUser(rootfs, "carol"); err == nil && u.Uid == 42 {
			found++
		}
		if u, err := lookupUser(rootfs, "mallory"); err == nil {
			t.Fatalf("found %+v in a database outside the root", u)
		}
	}
	if found == 0 {
		t.Error("never found the container's own user while its /etc was in place")
	}
}

// A directory on the way to the user database that is a symlink out of the root (a running container swapped
// /etc for one) is resolved inside the root, never on the guest's own /etc.
func TestLookupUserResolvesDirectoriesInRootfs(t *testing.T) {
	outside := t.TempDir()
	if err := os.MkdirAll(filepath.Join(outside, "etc"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(outside, "etc", "passwd"), []byte("mallory:x:7:7::/:/bin/sh\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	rootfs := t.TempDir()
	if err := os.Symlink(filepath.Join(outside, "etc"), filepath.Join(rootfs, "etc")); err != nil {
		t.Fatal(err)
	}
	if u, err := lookupUser(rootfs, "mallory"); err == nil {
		t.Fatalf("found %+v in a database outside the root", u)
	}
}
