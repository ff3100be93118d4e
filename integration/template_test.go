package integration

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	logtest "github.com/sirupsen/logrus/hooks/test"
	"golang.org/x/sys/unix"

	"github.com/kiln-runtime/kiln/config"
	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
	"github.com/kiln-runtime/kiln/runtime/bundle"
	"github.com/kiln-runtime/kiln/runtime/pod"
)

// TestTemplateClones starts two pods with fast_start = "template": the first builds the template and both are
// restored from it, with their vsock and virtio-fs devices hot-plugged, and both run at once. Each runs containers
// from the share (which the agent mounted after the restore). The two guests must be machines of their own: their
// own boot id, their own random numbers (the host seeds each clone), their clocks set from the host, and nothing
// one wrote into its memory (a tmpfs in the guest) visible to the other. The template's files must not change
// while clones run, and the clones must leave nothing behind.
func TestTemplateClones(t *testing.T) {
	requireVM(t)
	templates, fast := templatesOfTheirOwn(t)

	t.Cleanup(func() {
		// Registered before the pods, so it runs once they are closed.
		if left := cloneFiles(t, templates); len(left) > 0 {
			t.Errorf("clones left %v behind", left)
		}
	})
	var sums map[string]string
	pods := map[string]*containerVM{}
	var hooks []*logtest.Hook
	t.Cleanup(func() {
		// The pods are closed by now. A clone's agent runs from the agent image, whose device QEMU 7.2 leaves
		// reset in a clone: an orderly restart would wait for it until the host gives up.
		for _, hook := range hooks {
			for _, e := range hook.AllEntries() {
				if strings.Contains(e.Message, "did not power off") {
					t.Errorf("a clone did not power off by itself: %s", e.Message)
				}
			}
		}
	})
	for _, name := range []string{"first", "second"} {
		hook := new(logtest.Hook)
		hooks = append(hooks, hook)
		pods[name] = newNamedContainerVM(t, podID(t)+"-"+name, 256, fast, hook)
		for _, e := range hook.AllEntries() {
			if strings.Contains(e.Message, "template") {
				t.Fatalf("pod %s did not start from the template: %s: %v", name, e.Message, e.Data)
			}
		}
		if sums == nil {
			sums = templateSums(t, templates)
		}
		// `make image` built the agent image beside the initramfs: the template's agent ran from it before the
		// save, so each clone maps the binary from the host's page cache instead of holding a copy in its RAM.
		info, err := pods[name].p.GuestInfo(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		if want := filepath.Join(agentv1.GuestAgentImageDir, agentv1.AgentImageBinary); info.GetAgentExecutable() != want {
			t.Errorf("pod %s: the agent runs from %q, want the agent image's %s", name, info.GetAgentExecutable(), want)
		}
	}
	// What each guest says about itself, read first thing in each: the command line it booted with (the
	// template's), its boot id, 16 bytes of its kernel's random numbers, its wall clock.
	type guest struct{ cmdline, bootID, random, clock string }
	seen := map[string]guest{}
	for _, name := range []string{"first", "second"} {
		v := pods[name]
		out, errOut, status := v.output(t, "probe", v.spec("sh", "-c",
			"cat /proc/cmdline /proc/sys/kernel/random/boot_id; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; date +%s"))
		if status != 0 {
			t.Fatalf("%s: container status %d, stderr %q", name, status, errOut)
		}
		lines := strings.Split(strings.TrimSpace(out), "\n")
		if len(lines) != 4 || !strings.Contains(lines[0], "kiln.template=1") || len(lines[2]) != 32 {
			t.Fatalf("%s: container saw %q, want the template guest's command line, a boot id, 16 random bytes, the time", name, out)
		}
		seen[name] = guest{lines[0], lines[1], lines[2], lines[3]}
		clock, err := strconv.ParseInt(lines[3], 10, 64)
		if err != nil {
			t.Fatalf("%s: guest clock %q: %v", name, lines[3], err)
		}
		if d := time.Since(time.Unix(clock, 0)); d < -time.Minute || d > time.Minute {
			t.Errorf("%s: guest clock %s is %s off the host's (a clone's clock must be set from the host)", name, time.Unix(clock, 0), d)
		}
	}
	if seen["first"].bootID == seen["second"].bootID {
		t.Errorf("both clones report boot id %s", seen["first"].bootID)
	}
	if seen["first"].random == seen["second"].random {
		t.Errorf("both clones' kernels gave the same random bytes %s", seen["first"].random)
	}
	// A file the first guest writes into its own memory (the container's /dev/shm is a tmpfs of the guest) while
	// both run: the second must not see it.
	marker := "written by the first clone " + seen["first"].random
	if _, errOut, status := pods["first"].output(t, "write", pods["first"].spec("sh", "-c", "echo '"+marker+"' > /dev/shm/marker && cat /dev/shm/marker")); status != 0 {
		t.Fatalf("first: writing into the guest's memory: status %d, stderr %q", status, errOut)
	}
	out, _, _ := pods["second"].output(t, "read", pods["second"].spec("sh", "-c", "cat /dev/shm/marker 2>&1; grep -rl 'written by the first clone' /dev/shm /tmp 2>/dev/null; true"))
	if strings.Contains(out, "written by the first clone") || !strings.Contains(out, "No such file") {
		t.Errorf("second clone sees the first's file: %q", out)
	}
	// The agent image is read-only to the guests: the guest's root (here a container allowed to make and write
	// block devices) writes a block of it past every cache and reads back what was there, and the host's file
	// stays as it was.
	image := filepath.Join(filepath.Dir(pods["first"].p.Config().Hypervisor.Initrd), config.AgentImageFile)
	imageSum := fileSum(t, image)
	spec := pods["first"].spec("sh", "-c", `d=$(cat /sys/block/pmem0/dev) && mknod /dev/agentimg b ${d%:*} ${d#*:} || exit 1
read() { dd if=/dev/agentimg bs=4096 skip=100 count=1 iflag=direct 2>/dev/null | md5sum; }
read; dd if=/dev/urandom of=/dev/agentimg bs=4096 seek=100 count=1 conv=notrunc oflag=direct 2>/dev/null; read`)
	spec.Process.Capabilities.Bounding = append(spec.Process.Capabilities.Bounding, "CAP_MKNOD")
	spec.Process.Capabilities.Effective = append(spec.Process.Capabilities.Effective, "CAP_MKNOD")
	spec.Process.Capabilities.Permitted = append(spec.Process.Capabilities.Permitted, "CAP_MKNOD")
	spec.Linux.Resources.Devices = append(spec.Linux.Resources.Devices, specs.LinuxDeviceCgroup{Allow: true, Access: "rwm"})
	out, errOut, status := pods["first"].output(t, "pmem", spec)
	if sums := strings.Fields(out); status != 0 || len(sums) != 4 || sums[0] != sums[2] {
		t.Errorf("the guest's write to its agent image: status %d, stdout %q (want the block's sum twice, unchanged), stderr %q", status, out, errOut)
	}
	if got := fileSum(t, image); got != imageSum {
		t.Errorf("the guest changed the agent image %s", image)
	}
	// The host's first NVMe disk has the agent image's numbers in a clone (block 259:0): a container that lists it
	// is refused, naming the guest's device, instead of getting the agent image as its disk.
	nvme := pods["first"].spec("true")
	nvme.Linux.Devices = append(nvme.Linux.Devices, specs.LinuxDevice{Path: "/dev/nvme0n1", Type: "b", Major: 259, Minor: 0})
	first := pods["first"]
	c, err := first.p.CreateContainer(testCtx(t, time.Minute), pod.ContainerOptions{ID: "nvme", Bundle: &bundle.Bundle{Dir: first.bundle, Spec: nvme, Rootfs: filepath.Join(first.bundle, "rootfs")}})
	if err == nil {
		_, _ = first.p.DeleteContainer(testCtx(t, time.Minute), c, true)
		t.Error("a container listing block device 259:0 as /dev/nvme0n1 was created in a clone, whose 259:0 is the agent image")
	} else if !strings.Contains(err.Error(), "/dev/nvme0n1 (b 259:0): the VM's device with those numbers is /dev/pmem0") {
		t.Errorf("a container listing block device 259:0 as /dev/nvme0n1: %v, want a refusal naming /dev/pmem0", err)
	}
	if got := templateSums(t, templates); !equalSums(got, sums) {
		t.Errorf("template files changed while clones ran: before %v, after %v", sums, got)
	}
}

// fileSum is the SHA-256 of the file at path.
func fileSum(t *testing.T, path string) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// cloneFiles lists what a template directory holds besides templates (directories named by their key) and
// their lock files: clones keep their RAM in memfds of their own, never in files.
func cloneFiles(t *testing.T, templates string) []string {
	t.Helper()
	entries, err := os.ReadDir(templates)
	if err != nil {
		t.Fatal(err)
	}
	var left []string
	for _, e := range entries {
		key := strings.TrimSuffix(e.Name(), ".lock")
		if len(key) != 32 || strings.Trim(key, "0123456789abcdef") != "" || e.IsDir() == (key != e.Name()) {
			left = append(left, e.Name())
		}
	}
	return left
}

// TestTemplateRestoreFailureBootsCold damages a template's saved state after a first pod built it: the next pod's
// restore fails once its QEMU runs, and the pod boots the usual way instead, with a warning, leaving nothing of
// the failed clone behind (the harness checks the state root, QEMU processes and virtiofsd) and removing the
// template QEMU refused.
func TestTemplateRestoreFailureBootsCold(t *testing.T) {
	requireVM(t)
	templates, fast := templatesOfTheirOwn(t)
	t.Run("build", func(t *testing.T) {
		hook := new(logtest.Hook)
		newContainerVMWith(t, 256, fast, hook)
		for _, e := range hook.AllEntries() {
			if strings.Contains(e.Message, "template") {
				t.Fatalf("pod did not start from the template: %s: %v", e.Message, e.Data)
			}
		}
	})
	states, err := filepath.Glob(filepath.Join(templates, "*", templateStateFile))
	if err != nil || len(states) != 1 {
		t.Fatalf("template state files %v (%v), want one", states, err)
	}
	if err := os.Truncate(states[0], 64); err != nil {
		t.Fatal(err)
	}
	t.Run("damaged", func(t *testing.T) { bootsColdWithWarning(t, fast, "from its template failed") })
	if left := cloneFiles(t, templates); len(left) > 0 {
		t.Errorf("failed clone left %v behind", left)
	}
	// The refused template is gone, so that the next pod builds a good one.
	if left, _ := filepath.Glob(filepath.Join(templates, "*", templateStateFile)); len(left) != 0 {
		t.Errorf("refused template still there: %v", left)
	}
}

// TestTemplateDamagedIsBuiltAgain damages a built template's files by hand: its RAM cut short (QEMU would refuse
// it at its start, before any restore) and its state removed (the directory would keep a new build's rename from
// landing). Each time the next pod finds the damage, removes the template with a warning, builds it again and is
// restored from the new one; the one template left is whole.
func TestTemplateDamagedIsBuiltAgain(t *testing.T) {
	requireVM(t)
	templates, fast := templatesOfTheirOwn(t)
	newContainerVMWith(t, 256, fast, new(logtest.Hook))
	for _, tc := range []struct {
		name   string
		damage func(dir string) error
	}{
		{"RAM cut short", func(dir string) error { return os.Truncate(filepath.Join(dir, "ram"), 1<<20) }},
		{"state removed", func(dir string) error { return os.Remove(filepath.Join(dir, templateStateFile)) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dirs, err := filepath.Glob(filepath.Join(templates, "*", "ram"))
			if err != nil || len(dirs) != 1 {
				t.Fatalf("template RAM files %v (%v), want one", dirs, err)
			}
			if err := tc.damage(filepath.Dir(dirs[0])); err != nil {
				t.Fatal(err)
			}
			hook := new(logtest.Hook)
			v := newContainerVMWith(t, 256, fast, hook)
			warned := false
			for _, e := range hook.AllEntries() {
				warned = warned || strings.Contains(e.Message, "removed a template of no use")
			}
			if !warned {
				t.Error("no warning that the damaged template was removed")
			}
			out, errOut, status := v.output(t, "probe", v.spec("cat", "/proc/cmdline"))
			if status != 0 || !strings.Contains(out, "kiln.template") {
				t.Fatalf("container saw %q (status %d, stderr %q), want a guest restored from the rebuilt template", out, status, errOut)
			}
			rams, _ := filepath.Glob(filepath.Join(templates, "*", "ram"))
			states, _ := filepath.Glob(filepath.Join(templates, "*", templateStateFile))
			if len(rams) != 1 || len(states) != 1 {
				t.Fatalf("after the rebuild: RAM files %v, state files %v; want one of each", rams, states)
			}
			// The RAM a VM may grow to (hypervisor.memory_max_mib) and a block for the firmware's tables, its guest
			// booted with 256 MiB of it.
			st, err := os.Stat(rams[0])
			if want := int64(config.DefaultMemoryMaxMiB+config.MemoryBlockMiB) << 20; err != nil || st.Size() != want {
				t.Fatalf("rebuilt template RAM: %v, %v; want %d bytes", st, err, want)
			}
			if left := cloneFiles(t, templates); len(left) > 0 {
				t.Errorf("left %v in the template directory", left)
			}
		})
	}
}

// templatesOfTheirOwn gives a test a template directory of its own on tmpfs, as in production (QEMU's user must
// reach it), removed when the test ends, and the configuration change that uses it.
func templatesOfTheirOwn(t *testing.T) (string, func(*config.Config)) {
	t.Helper()
	top, err := os.MkdirTemp("/dev/shm", "kiln-it-tpl-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(top) })
	if err := os.Chmod(top, 0o711); err != nil {
		t.Fatal(err)
	}
	templates := filepath.Join(top, "templates")
	return templates, func(c *config.Config) {
		c.Hypervisor.FastStart = config.FastStartTemplate
		c.Hypervisor.TemplateDir = templates
	}
}

// templateStateFile is a template's saved device state, in its directory.
const templateStateFile = "state"

// templateSums are the SHA-256 sums of every template file under dir (path relative to dir).
func templateSums(t *testing.T, dir string) map[string]string {
	t.Helper()
	sums := map[string]string{}
	tpls, err := filepath.Glob(filepath.Join(dir, "*", "*"))
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range tpls {
		rel, _ := filepath.Rel(dir, p)
		sums[rel] = fileSum(t, p)
	}
	if len(sums) != 3 {
		t.Fatalf("template files %v, want one template's ram, state and inputs", sums)
	}
	return sums
}

func equalSums(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}

// A template whose saved guest restores but does not come up (the upper part of its RAM zeroed here: QEMU loads
// the state, and the guest dies once it runs; one whose agent never answers takes the same path after the dial
// timeout) costs the pod a cold boot with a warning, not its start; the template goes, so that the next pod builds
// a good one.
func TestTemplateDeadGuestBootsCold(t *testing.T) {
	requireVM(t)
	templates, fast := templatesOfTheirOwn(t)
	quick := func(c *config.Config) {
		fast(c)
		c.Agent.DialTimeout = config.Duration(20 * time.Second)
	}
	t.Run("build", func(t *testing.T) { newContainerVMWith(t, 256, quick, new(logtest.Hook)) })
	rams, err := filepath.Glob(filepath.Join(templates, "*", "ram"))
	if err != nil || len(rams) != 1 {
		t.Fatalf("template RAM files %v (%v), want one", rams, err)
	}
	fi, err := os.Stat(rams[0])
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(rams[0], 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(rams[0], os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	// Above the guest kernel's own pages: QEMU loads the state, and the guest dies once it runs.
	const off = 64 << 20
	if err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, fi.Size()-off); err != nil {
		t.Fatal(err)
	}
	_ = f.Close()
	// The guest dies as it runs: once its QEMU has answered cont (the restored VM did not come up), or before (QEMU
	// exited with cont unanswered), depending on how soon it runs into the zeroed pages.
	t.Run("dead guest", func(t *testing.T) {
		bootsColdWithWarning(t, quick, "restored from its template did not come up", "died as it resumed")
	})
	if left, _ := filepath.Glob(filepath.Join(templates, "*", templateStateFile)); len(left) != 0 {
		t.Errorf("the dead guest's template is still there: %v", left)
	}
}

// bootsColdWithWarning starts a pod with mutate and checks that its VM was booted, not restored (no kiln.template on
// its guest's command line), after a warning that says one of warnings (in its message or its error).
func bootsColdWithWarning(t *testing.T, mutate func(*config.Config), warnings ...string) {
	t.Helper()
	hook := new(logtest.Hook)
	v := newContainerVMWith(t, 256, mutate, hook)
	warned := false
	var logged []string
	for _, e := range hook.AllEntries() {
		line, _ := e.String()
		logged = append(logged, line)
		for _, w := range warnings {
			warned = warned || strings.Contains(line, w)
		}
	}
	if !warned {
		t.Errorf("no warning with any of %q; log:\n%s", warnings, strings.Join(logged, ""))
	}
	out, errOut, status := v.output(t, "probe", v.spec("cat", "/proc/cmdline"))
	if status != 0 || strings.Contains(out, "kiln.template") {
		t.Fatalf("container saw %q (status %d, stderr %q), want a cold-booted guest", out, status, errOut)
	}
}
