package qemu

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/kiln-runtime/kiln/vm/accel"
)

// Template guests and clones are q35 machines whose devices a clone's command line repeats; with an agent image
// both get it as a read-only, shared virtio-pmem device at the same address, and room for it in their memory map.
// Cold boots are microvms (no memory devices, so no agent image).
func TestTemplateAndCloneArgs(t *testing.T) {
	base := Config{ID: "x", Accel: accel.TCG, VCPUs: 1, MemoryMiB: 256, Kernel: "/k", Initrd: "/i", FreePageReporting: true,
		SharedDir: "/share", Nets: []Net{{MAC: net.HardwareAddr{2, 0, 0, 0, 0, 1}}}}
	machine := "-M q35,memory-backend=mem,smbus=off,sata=off"
	ports := "-device pcie-root-port,id=rp0,chassis=1,bus=pcie.0,addr=0x2"
	balloon := "-device virtio-balloon-pci,free-page-reporting=on,bus=pcie.0,addr=0x4"
	pmem := "-device virtio-pmem-pci,memdev=agentimg,id=agentimg0,bus=pcie.0,addr=0x7"
	tests := []struct {
		name       string
		role       role
		agentImage bool
		fds        fdLayout
		want       []string
		absent     []string
	}{
		{"template", roleTemplate, false, fdLayout{qmp: 3},
			[]string{machine, ports, balloon, "kiln.template=1", "-m 256M "},
			// No vhost-user device, no NIC, nothing to restore: the template is booted, then saved through its one
			// monitor.
			[]string{"vhost-user", "-netdev", "virtio-net", "-incoming", "microvm", "virtio-mmio", " acpi=off", "id=save",
				"virtio-pmem", "slots=", "kiln.agent_image"}},
		{"clone", roleClone, false, fdLayout{qmp: 3, vsockChardev: 4, virtiofs: 5, firstNet: 6, incomingState: 7},
			[]string{machine, ports, balloon, "kiln.template=1", "-chardev socket,id=vsock,fd=4", "-chardev socket,id=fs,fd=5",
				"-netdev tap,id=net0,fd=6,vhost=off", "-incoming defer", "-kernel /k "},
			// The devices come by hot-plug once the state is loaded.
			[]string{"-device vhost-user", "virtio-net", "microvm", "id=save", " acpi=off"}},
		{"clone with a kernel stub", roleClone, false, fdLayout{qmp: 3, vsockChardev: 4, virtiofs: 5, firstNet: 6, incomingState: 7, memory: 8, kernel: 9},
			[]string{"-kernel /proc/self/fd/9 ", "-initrd /i ", "mem-path=/proc/self/fd/8,"},
			[]string{"-kernel /k "}},
		// A guest that may grow boots a copy of the kernel (bootKernel); the template's key is computed without it.
		{"template given its boot kernel", roleTemplate, false, fdLayout{qmp: 3, kernel: 9},
			[]string{"-kernel /proc/self/fd/9 "},
			[]string{"-kernel /k "}},
		{"template without one", roleTemplate, false, fdLayout{qmp: 3},
			[]string{"-kernel /k "},
			[]string{"/proc/self/fd/9"}},
		{"cold boot", roleCold, true, fdLayout{qmp: 3, vsockArgs: (&vhostUserVsock{}).qemuArgs(4), virtiofs: 5, firstNet: 6},
			[]string{"microvm", "-device vhost-user-fs-device", "virtio-net-device", "-m 256M "},
			[]string{"q35", "kiln.template", "-incoming", "pcie-root-port", "virtio-pmem", "agentimg", "slots=", "kiln.agent_image"}},
		{"template with the agent image", roleTemplate, true, fdLayout{qmp: 3, agentImage: 4},
			[]string{"-m 256M,slots=1,maxmem=1280M ", "kiln.agent_image=1",
				"-object memory-backend-file,id=agentimg,mem-path=/proc/self/fd/4,size=10485760,share=on,readonly=on", pmem},
			[]string{"/share/kiln/agent.img"}},
		{"the template's key", roleTemplate, true, fdLayout{qmp: 3},
			[]string{"mem-path=/share/kiln/agent.img,size=10485760,", pmem}, nil},
		{"clone with the agent image", roleClone, true, fdLayout{qmp: 3, vsockChardev: 4, virtiofs: 5, firstNet: 6, incomingState: 7, memory: 8, agentImage: 9},
			[]string{"-m 256M,slots=1,maxmem=1280M ", "kiln.agent_image=1", "mem-path=/proc/self/fd/9,size=10485760,share=on,readonly=on", pmem},
			nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := base
			c.role = tt.role
			if tt.agentImage {
				c.AgentImage, c.agentImageSize = "/share/kiln/agent.img", 10<<20
			}
			checkArgs(t, args(c, tt.fds), tt.want, tt.absent)
		})
	}
}

// QEMU gets the agent image its template was keyed by, or nothing: a file replaced since would show a restored
// guest bytes other than those its kernel has cached.
func TestOpenAgentImage(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "agent.img")
	if err := os.WriteFile(img, []byte("image one"), 0o644); err != nil {
		t.Fatal(err)
	}
	inputs, err := templateInputs(img)
	if err != nil {
		t.Fatal(err)
	}
	c := Config{AgentImage: img, agentImageSize: int64(len("image one")), templateInputs: inputs}
	f, err := openAgentImage(c)
	if err != nil {
		t.Fatalf("the image the template was keyed by: %v", err)
	}
	f.Close()

	other := c
	other.templateInputs = strings.Replace(inputs, img, filepath.Join(dir, "other.img"), 1)
	if f, err := openAgentImage(other); err == nil || !strings.Contains(err.Error(), "changed after its template was chosen") {
		if f != nil {
			f.Close()
		}
		t.Errorf("inputs naming another file: %v", err)
	}
	// make install replaces the file (a new inode), as a rebuilt image would.
	tmp := img + ".new"
	if err := os.WriteFile(tmp, []byte("image two, longer"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, img); err != nil {
		t.Fatal(err)
	}
	if f, err := openAgentImage(c); err == nil || !strings.Contains(err.Error(), "changed after its template was chosen") {
		if f != nil {
			f.Close()
		}
		t.Errorf("a replaced image: %v", err)
	}
	if _, err := openAgentImage(Config{AgentImage: filepath.Join(dir, "missing.img")}); err == nil {
		t.Error("no error for a missing image")
	}
}

func TestHotplugDevices(t *testing.T) {
	c := Config{SharedDir: "/share", Nets: []Net{{MAC: net.HardwareAddr{2, 0, 0, 0, 0, 1}, MTU: 1400}, {MAC: net.HardwareAddr{2, 0, 0, 0, 0, 2}}}}
	b, err := json.Marshal(hotplugDevices(c))
	if err != nil {
		t.Fatal(err)
	}
	want := `[{"bus":"rp0","chardev":"vsock","driver":"vhost-user-vsock-pci","id":"vsock0"},` +
		`{"bus":"rp1","chardev":"fs","driver":"vhost-user-fs-pci","id":"fs0","tag":"kiln-shared"},` +
		`{"bus":"rp2","driver":"virtio-net-pci","host_mtu":1400,"id":"nic0","mac":"02:00:00:00:00:01","netdev":"net0","romfile":""},` +
		`{"bus":"rp3","driver":"virtio-net-pci","id":"nic1","mac":"02:00:00:00:00:02","netdev":"net1","romfile":""}]`
	if string(b) != want {
		t.Errorf("devices\n%s\nwant\n%s", b, want)
	}
}

func TestCloneUnsupported(t *testing.T) {
	nic := Net{MAC: net.HardwareAddr{2, 0, 0, 0, 0, 1}}
	tests := []struct {
		name string
		c    Config
		want string
	}{
		{"vhost-user vsock, two NICs", Config{SharedDir: "/s", Nets: []Net{nic, nic}}, ""},
		{"four NICs", Config{SharedDir: "/s", Nets: []Net{nic, nic, nic, nic}}, ""},
		{"no shared directory", Config{}, "shared directory"},
		{"kernel vsock", Config{SharedDir: "/s", Vsock: VsockKernel}, "vhost-vsock"},
		{"five NICs", Config{SharedDir: "/s", Nets: []Net{nic, nic, nic, nic, nic}}, "at most 4"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := cloneUnsupported(tt.c)
			if tt.want == "" && got != "" || tt.want != "" && !strings.Contains(got, tt.want) {
				t.Errorf("cloneUnsupported = %q, want %q", got, tt.want)
			}
		})
	}
}

// The key changes with anything that shapes the guest, and only with that.
func TestTemplateKey(t *testing.T) {
	dir := t.TempDir()
	files := map[string]string{}
	for _, n := range []string{"qemu", "kernel", "initrd", "agent.img"} {
		files[n] = filepath.Join(dir, n)
		if err := os.WriteFile(files[n], []byte(n), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	base := Config{ID: "pod-a", Accel: accel.TCG, VCPUs: 1, MemoryMiB: 256, Kernel: files["kernel"], Initrd: files["initrd"],
		TemplateDir: "/tpl", SharedDir: "/share/a", Nets: []Net{{MAC: net.HardwareAddr{2, 0, 0, 0, 0, 1}}}}
	key := func(c Config) string {
		k, _, err := templateKey(c, files["qemu"])
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
	want := key(base)
	same := []struct {
		name   string
		mutate func(*Config)
	}{
		{"another pod", func(c *Config) { c.ID, c.SharedDir, c.Nets = "pod-b", "/share/b", nil }},
		{"another clone RAM file", func(c *Config) { c.MemoryFile = "/tpl/clones/0123456789abcdef/pod-a.ram" }},
		// Read from the host's "cpu MHz", which frequency scaling moves; a clone never calibrates its clock.
		{"another TSC reading", func(c *Config) { c.TSCkHz = 2194843 }},
	}
	for _, s := range same {
		c := base
		s.mutate(&c)
		if got := key(c); got != want {
			t.Errorf("%s: key %s, want %s", s.name, got, want)
		}
	}
	differ := []struct {
		name   string
		mutate func(*Config)
	}{
		{"memory", func(c *Config) { c.MemoryMiB = 512 }},
		{"vCPUs", func(c *Config) { c.VCPUs = 2 }},
		{"accelerator", func(c *Config) { c.Accel = accel.KVM }},
		{"kernel parameters", func(c *Config) { c.KernelParams = []string{"kiln.debug=1"} }},
		{"balloon", func(c *Config) { c.FreePageReporting = true }},
		{"kernel file", func(c *Config) { c.Kernel = files["initrd"] }},
		{"agent image", func(c *Config) { c.AgentImage, c.agentImageSize = files["agent.img"], 9 }},
	}
	for _, d := range differ {
		c := base
		d.mutate(&c)
		if got := key(c); got == want {
			t.Errorf("%s changed, key did not", d.name)
		}
	}
	// A rebuilt initrd (new agent) is a new template.
	if err := os.WriteFile(files["initrd"], []byte("initrd, rebuilt"), 0o644); err != nil {
		t.Fatal(err)
	}
	if got := key(base); got == want {
		t.Error("initrd rewritten, key unchanged")
	}
	// So is a rebuilt agent image.
	withImage := base
	withImage.AgentImage, withImage.agentImageSize = files["agent.img"], 9
	before := key(withImage)
	if err := os.WriteFile(files["agent.img"], []byte("agent.img"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Chtimes(files["agent.img"], time.Now(), time.Now().Add(time.Second)); err != nil {
		t.Fatal(err)
	}
	if got := key(withImage); got == before {
		t.Error("agent image rewritten, key unchanged")
	}
	if _, _, err := templateKey(base, filepath.Join(dir, "missing")); err == nil {
		t.Error("no error for a missing QEMU binary")
	}
}

// A clone's RAM is a memfd of the template's size at once, then, once filled, holding the template's data extents
// only, sealed as QEMU seals its own memfds.
func TestCloneRAM(t *testing.T) {
	src := filepath.Join(t.TempDir(), "src")
	const size = 8 << 20
	f, err := os.Create(src)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte("kiln"), 4096)
	for _, off := range []int64{0, 3 << 20, size - int64(len(data))} {
		if _, err := f.WriteAt(data, off); err != nil {
			t.Fatal(err)
		}
	}
	f.Close()
	ram, err := startCloneRAM(src, "kiln-test")
	if err != nil {
		t.Fatal(err)
	}
	defer ram.close()
	mem := ram.file
	if st, err := mem.Stat(); err != nil || st.Size() != size {
		t.Fatalf("memfd before the copy: %v, %v; want %d bytes", st, err, size)
	}
	n, err := ram.wait(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	a, _ := os.ReadFile(src)
	b, err := io.ReadAll(io.NewSectionReader(mem, 0, size+1))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(a, b) {
		t.Fatal("copy differs from the source")
	}
	if n >= size/2 {
		t.Errorf("copied %d bytes of a mostly sparse %d-byte file", n, size)
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(mem.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	if st.Blocks*512 >= size/2 {
		t.Errorf("copy holds %d bytes, want it sparse", st.Blocks*512)
	}
	seals, err := unix.FcntlInt(mem.Fd(), unix.F_GET_SEALS, 0)
	if err != nil {
		t.Fatal(err)
	}
	if want := unix.F_SEAL_SHRINK | unix.F_SEAL_GROW | unix.F_SEAL_SEAL; seals != want {
		t.Errorf("seals %#x, want %#x", seals, want)
	}
	if err := mem.Truncate(size / 2); err == nil {
		t.Error("the copy could be shrunk")
	}
}

// A copy that fails in the background is reported by wait, which the restore calls before QEMU reads guest RAM.
func TestCloneRAMCopyFailure(t *testing.T) {
	// A directory opens and has a size, but its data cannot be found or read: which of the two fails depends on
	// the file system (SEEK_DATA on a directory is EINVAL on some, and reading it EISDIR on all).
	dir := t.TempDir()
	ram, err := startCloneRAM(dir, "kiln-test")
	if err != nil {
		t.Fatal(err)
	}
	defer ram.close()
	if _, err := ram.wait(context.Background()); err == nil || !strings.Contains(err.Error(), dir) ||
		!(errors.Is(err, unix.EISDIR) || errors.Is(err, unix.EINVAL)) {
		t.Errorf("wait: %v, want the copy's failure, naming %s", err, dir)
	}
	if _, err := startCloneRAM(filepath.Join(t.TempDir(), "missing"), "kiln-test"); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing template RAM: %v", err)
	}
}

// kernelInput writes a stand-in kernel into dir and returns its path and its templateInputs line.
func kernelInput(t *testing.T, dir string) (path, inputs string) {
	t.Helper()
	path = filepath.Join(dir, "kernel")
	if err := os.WriteFile(path, []byte("v1"), 0o644); err != nil {
		t.Fatal(err)
	}
	inputs, err := templateInputs(path)
	if err != nil {
		t.Fatal(err)
	}
	return path, inputs
}

// subdirs lists dir's directories.
func subdirs(dir string) []string {
	var names []string
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		if e.IsDir() {
			names = append(names, e.Name())
		}
	}
	return names
}

// repeatedKey is a template key made of one repeated character.
func repeatedKey(c byte) string { return strings.Repeat(string(c), 32) }

// pruneTemplates removes exactly the templates whose inputs changed, partial builds nobody is making and the
// remains of discarded templates; anything whose lock is held stays.
func TestPruneTemplates(t *testing.T) {
	dir := t.TempDir()
	input, current := kernelInput(t, dir)
	gone := strings.Replace(current, input, filepath.Join(dir, "removed-kernel"), 1)
	mk := func(name, inputs string) {
		t.Helper()
		if err := os.MkdirAll(filepath.Join(dir, name), 0o700); err != nil {
			t.Fatal(err)
		}
		if inputs != "" {
			if err := os.WriteFile(filepath.Join(dir, name, templateInputsFile), []byte(inputs), 0o400); err != nil {
				t.Fatal(err)
			}
		}
	}
	mk(repeatedKey('a'), current)            // current: stays
	mk(repeatedKey('b'), gone)               // an input removed: stale
	mk(repeatedKey('c'), "")                 // no inputs recorded: stale
	mk(repeatedKey('d'), gone)               // stale, but its lock is held: stays
	mk(repeatedKey('e')+".tmp", "")          // a build that died: removed
	mk(repeatedKey('f')+".tmp", "")          // a build in progress (lock held): stays
	mk(repeatedKey('1')+".discarded-42", "") // remains of a discard: removed
	mk("not-a-template", "")                 // not Kiln's: stays
	for _, k := range []byte{'2', 'a'} {     // the lock of no template, removed; a current template's, stays
		if err := os.WriteFile(filepath.Join(dir, repeatedKey(k)+".lock"), nil, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	for _, k := range []byte{'d', 'f'} {
		unlock, err := lockFile(context.Background(), filepath.Join(dir, repeatedKey(k)+".lock"))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(unlock)
	}
	pruneTemplates(dir, 0, logrus.NewEntry(logrus.New()))
	left := subdirs(dir)
	want := []string{repeatedKey('a'), repeatedKey('d'), repeatedKey('f') + ".tmp", "not-a-template"}
	if !slices.Equal(left, want) {
		t.Errorf("left %v, want %v", left, want)
	}
	for _, k := range []byte{'b', '2'} {
		if _, err := os.Stat(filepath.Join(dir, repeatedKey(k)+".lock")); err == nil {
			t.Errorf("the lock of removed or missing template %s stayed", repeatedKey(k))
		}
	}
	for _, k := range []byte{'a', 'd', 'f'} {
		if _, err := os.Stat(filepath.Join(dir, repeatedKey(k)+".lock")); err != nil {
			t.Errorf("the lock of template %s: %v", repeatedKey(k), err)
		}
	}
	// A kernel rebuilt since makes the current template stale too.
	if err := os.WriteFile(input, []byte("v2, rebuilt"), 0o644); err != nil {
		t.Fatal(err)
	}
	pruneTemplates(dir, 0, logrus.NewEntry(logrus.New()))
	if _, err := os.Stat(filepath.Join(dir, repeatedKey('a'))); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("template built from a kernel since rebuilt stayed (%v)", err)
	}
}

// Beyond template_max, the least recently used templates go, except one used within templateInUse (a VM may be
// copying it) and one whose lock is held (being rebuilt).
func TestPruneTemplatesKeepsTheMostRecentlyUsed(t *testing.T) {
	dir := t.TempDir()
	_, inputs := kernelInput(t, dir)
	now := time.Now()
	// Last used: a an hour ago, b two hours, c three (its lock held), d four, e five; f ten seconds ago.
	ages := map[byte]time.Duration{'a': time.Hour, 'b': 2 * time.Hour, 'c': 3 * time.Hour, 'd': 4 * time.Hour, 'e': 5 * time.Hour, 'f': 10 * time.Second}
	for k, age := range ages {
		p := filepath.Join(dir, repeatedKey(k))
		if err := os.Mkdir(p, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(p, templateInputsFile), []byte(inputs), 0o400); err != nil {
			t.Fatal(err)
		}
		if err := os.Chtimes(p, now.Add(-age), now.Add(-age)); err != nil {
			t.Fatal(err)
		}
	}
	unlock, err := lockFile(context.Background(), filepath.Join(dir, repeatedKey('c')+".lock"))
	if err != nil {
		t.Fatal(err)
	}
	defer unlock()
	// Using a template makes it the most recent.
	template{dir: filepath.Join(dir, repeatedKey('e'))}.used(logrus.New())
	pruneTemplates(dir, 2, logrus.NewEntry(logrus.New()))
	left := subdirs(dir)
	// e and f are the two most recent; a, b and d go; c stays while its lock is held.
	want := []string{repeatedKey('c'), repeatedKey('e'), repeatedKey('f')}
	if !slices.Equal(left, want) {
		t.Errorf("left %v, want %v", left, want)
	}
	// Unbounded, nothing current goes.
	pruneTemplates(dir, 0, logrus.NewEntry(logrus.New()))
	if entries, _ := os.ReadDir(dir); len(entries) < len(want) {
		t.Errorf("an unbounded prune removed current templates: %d entries left", len(entries))
	}
}

// A lock taken on a lock file that pruning removed meanwhile is taken again on the file now at the path, so two
// builders of one template never both hold "its" lock.
func TestLockFileFollowsARemovedLock(t *testing.T) {
	path := filepath.Join(t.TempDir(), strings.Repeat("a", 32)+".lock")
	unlock, err := lockFile(context.Background(), path)
	if err != nil {
		t.Fatal(err)
	}
	got := make(chan func(), 1)
	go func() {
		u, err := lockFile(context.Background(), path)
		if err != nil {
			t.Error(err)
			u = func() {}
		}
		got <- u
	}()
	time.Sleep(3 * templateLockPoll) // the waiter is waiting on the first file
	// Pruning removes the first file, and a builder arriving after it holds the path's new one. Its file takes the
	// path already locked: a lockFile after a plain removal could lose the path to the waiter, which polls.
	next, err := os.OpenFile(path+".next", os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Flock(int(next.Fd()), unix.LOCK_EX); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(path+".next", path); err != nil {
		t.Fatal(err)
	}
	holder := func() { next.Close() }
	unlock() // the first file's lock is free: the waiter must not count it as the lock
	select {
	case u := <-got:
		u()
		t.Fatal("the waiter took the removed file's lock while another process holds the path's")
	case <-time.After(5 * templateLockPoll):
	}
	holder()
	select {
	case u := <-got:
		u()
	case <-time.After(10 * time.Second):
		t.Fatal("the waiter did not take the lock once it was free")
	}
}

// A failed QMP command during a restore is its cause when QEMU exits meanwhile (a refused state, a guest that died
// as it resumed), and stays itself when QEMU is still there.
func TestRestoreErrorsWhenQEMUExits(t *testing.T) {
	qmpErr := errors.New("read unix @->qmp.sock: use of closed network connection")
	for _, tc := range []struct {
		name   string
		exited bool
		cause  error
		want   error
	}{
		{"cont, QEMU gone", true, errTemplateGuestDied, errTemplateGuestDied},
		{"cont, QEMU there", false, errTemplateGuestDied, nil},
		{"load, QEMU gone", true, errTemplateState, errTemplateState},
		{"load, QEMU there", false, errTemplateState, nil},
	} {
		m := &Machine{exited: make(chan struct{})}
		if tc.exited {
			close(m.exited)
		}
		err := m.exitedAs(qmpErr, tc.cause)
		if err == nil || !strings.Contains(err.Error(), qmpErr.Error()) {
			t.Errorf("%s: %v, want it to keep the QMP error", tc.name, err)
		}
		for _, sentinel := range []error{errTemplateGuestDied, errTemplateState} {
			if got := errors.Is(err, sentinel); got != (sentinel == tc.want) {
				t.Errorf("%s: errors.Is(%v, %v) = %v", tc.name, err, sentinel, got)
			}
		}
	}
}

// A template serves only when it is whole: both files there and its RAM of the guest's size.
func TestTemplateFault(t *testing.T) {
	const mib = 4
	for _, tc := range []struct {
		name    string
		make    func(dir string) error
		none    bool   // errNoTemplate
		errPart string // "" for a whole template
	}{
		{"none", func(string) error { return nil }, true, ""},
		{"whole", func(string) error { return nil }, false, ""},
		{"RAM cut short", func(dir string) error { return os.Truncate(filepath.Join(dir, templateRAM), 1<<20) }, false, "want the guest's"},
		{"RAM removed", func(dir string) error { return os.Remove(filepath.Join(dir, templateRAM)) }, false, "template RAM"},
		{"state removed", func(dir string) error { return os.Remove(filepath.Join(dir, templateState)) }, false, "template state"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tpl := template{dir: filepath.Join(t.TempDir(), "key")}
			if tc.name != "none" {
				if err := os.Mkdir(tpl.dir, 0o700); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(tpl.state(), []byte("state"), 0o600); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(tpl.ram(), nil, 0o600); err != nil {
					t.Fatal(err)
				}
				if err := os.Truncate(tpl.ram(), mib<<20); err != nil {
					t.Fatal(err)
				}
			}
			if err := tc.make(tpl.dir); err != nil {
				t.Fatal(err)
			}
			err := tpl.fault(mib)
			switch {
			case tc.none:
				if !errors.Is(err, errNoTemplate) {
					t.Fatalf("fault = %v, want errNoTemplate", err)
				}
			case tc.errPart == "":
				if err != nil {
					t.Fatalf("fault = %v, want nil", err)
				}
			case err == nil || errors.Is(err, errNoTemplate) || !strings.Contains(err.Error(), tc.errPart):
				t.Fatalf("fault = %v, want an error with %q", err, tc.errPart)
			}
		})
	}
}

// A spare's template build is never held: a task whose start holds the spares may be waiting for that template
// (ensureTemplate's lock), and would wait out the hold.
func TestTemplateBuildIsNotHeld(t *testing.T) {
	c := Config{ID: "spare", Hold: func(Holdable) {}, Background: true}
	if tc := templateConfig(c, "tpl", "/ram"); tc.Hold != nil {
		t.Fatal("the template's configuration keeps the spare's Hold")
	}
}

// A start given up while it waits for another process's template build leaves a Machine whose Stop and Wait
// return at once: nothing of it runs.
func TestStartGivenUpWaitingForTheTemplate(t *testing.T) {
	top, err := os.MkdirTemp("/dev/shm", "kiln-test-tpl-")
	if err != nil {
		t.Skip("no /dev/shm:", err)
	}
	t.Cleanup(func() { os.RemoveAll(top) })
	assets := t.TempDir()
	kernel, initrd := filepath.Join(assets, "vmlinuz"), filepath.Join(assets, "initrd.img")
	for _, p := range []string{kernel, initrd} {
		if err := os.WriteFile(p, []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	qemuPath, err := exec.LookPath("true")
	if err != nil {
		t.Skip(err)
	}
	cfg := Config{ID: "given-up", QEMU: qemuPath, Accel: accel.TCG, VCPUs: 1, MemoryMiB: 256, Kernel: kernel, Initrd: initrd,
		StateRoot: t.TempDir(), SharedDir: t.TempDir(), TemplateDir: filepath.Join(top, "templates")}
	m, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	key, _, err := templateKey(m.cfg, qemuPath)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(cfg.TemplateDir, 0o711); err != nil {
		t.Fatal(err)
	}
	unlock, err := lockFile(context.Background(), filepath.Join(cfg.TemplateDir, key+".lock")) // another builder
	if err != nil {
		t.Fatal(err)
	}
	defer unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 3*templateLockPoll)
	defer cancel()
	err = m.Start(ctx)
	t.Logf("Start: %v", err)
	if err == nil {
		t.Fatal("Start succeeded while another process held the template's lock past its context")
	}
	done := make(chan struct{})
	go func() {
		_ = m.Stop(context.Background())
		if err := m.Wait(ctx); err != nil { // ctx has ended: a released VM is still no error
			t.Errorf("Wait after the given-up start = %v", err)
		}
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Stop after a start given up waiting for the template did not return")
	}
}

// A VM tells which file its guest came from was replaced or removed since it started (a spare's is then stale),
// and nothing when it could not read them.
func TestFilesChanged(t *testing.T) {
	dir := t.TempDir()
	kernel, _ := kernelInput(t, dir)
	initrd := filepath.Join(dir, "initrd.img")
	if err := os.WriteFile(initrd, []byte("initrd one"), 0o644); err != nil {
		t.Fatal(err)
	}
	inputs, err := templateInputs(kernel, initrd)
	if err != nil {
		t.Fatal(err)
	}
	m := &Machine{inputs: inputs}
	if err := m.FilesChanged(); err != nil {
		t.Fatalf("nothing replaced: %v", err)
	}
	// make image writes a new file and renames it into place.
	tmp := initrd + ".new"
	if err := os.WriteFile(tmp, []byte("initrd two"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, initrd); err != nil {
		t.Fatal(err)
	}
	if err := m.FilesChanged(); err == nil || !strings.Contains(err.Error(), initrd) {
		t.Errorf("initrd replaced: %v, want an error naming it", err)
	}
	if err := os.Remove(kernel); err != nil {
		t.Fatal(err)
	}
	if err := m.FilesChanged(); err == nil || !strings.Contains(err.Error(), kernel) {
		t.Errorf("kernel removed: %v, want an error naming it", err)
	}
	if err := (&Machine{}).FilesChanged(); err != nil {
		t.Errorf("a VM that could not read its files: %v", err)
	}
}
