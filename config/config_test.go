package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestDefaultsAreValid(t *testing.T) {
	if err := Default().Validate(); err != nil {
		t.Fatal(err)
	}
}

// The VM cgroup's default limit must hold a full translation cache beside QEMU's own memory (about 40 MiB) and
// virtiofsd, or a busy TCG guest would push its QEMU into reclaim.
func TestDefaultOverheadHoldsTheTranslationCache(t *testing.T) {
	d := Default().Hypervisor
	if room := d.MemoryOverheadMiB - d.TCGTranslationCacheMiB; room < 64 {
		t.Fatalf("memory_overhead_mib %d leaves %d MiB beside tcg_translation_cache_mib %d: want at least 64",
			d.MemoryOverheadMiB, room, d.TCGTranslationCacheMiB)
	}
}

func TestParse(t *testing.T) {
	dir := t.TempDir()
	kernel := filepath.Join(dir, "vmlinuz")
	if err := os.WriteFile(kernel, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name    string
		toml    string
		errPart []string
		check   func(t *testing.T, c Config)
	}{
		{name: "empty file is the defaults", toml: "", check: func(t *testing.T, c Config) {
			if c.Hypervisor.MemoryMiB != Default().Hypervisor.MemoryMiB {
				t.Errorf("memory_mib %d", c.Hypervisor.MemoryMiB)
			}
		}},
		{name: "values", toml: `
[hypervisor]
path = "/usr/bin/qemu-system-x86_64"
accelerator = "tcg"
vcpus = 2
memory_mib = 512
kernel_params = ["foo=1"]
stop_timeout = "5s"
[vsock]
mode = "vhost-user"
[agent]
debug = true
dial_timeout = "10s"
request_timeout = "250ms"
[shared_fs]
virtiofsd = "/bin/sh"
cache = "always"
[runtime]
state_dir = "/tmp/kiln"
log_level = "debug"
enable_annotations = ["io.kiln.vcpus", "io.kiln.kernel_params*"]
`, check: func(t *testing.T, c Config) {
			if c.SharedFS.Virtiofsd != "/bin/sh" || c.SharedFS.Cache != "always" || c.Runtime.LogLevel != "debug" ||
				len(c.Runtime.EnableAnnotations) != 2 {
				t.Errorf("shared_fs %+v runtime %+v", c.SharedFS, c.Runtime)
			}
			h := c.Hypervisor
			if h.Path != "/usr/bin/qemu-system-x86_64" || h.Accelerator != "tcg" || h.VCPUs != 2 || h.MemoryMiB != 512 ||
				len(h.KernelParams) != 1 || h.StopTimeout.Std() != 5*time.Second {
				t.Errorf("hypervisor %+v", h)
			}
			if c.Vsock.Mode != "vhost-user" || !c.Agent.Debug || c.Agent.DialTimeout.Std() != 10*time.Second ||
				c.Agent.RequestTimeout.Std() != 250*time.Millisecond || c.Runtime.StateDir != "/tmp/kiln" {
				t.Errorf("config %+v", c)
			}
		}},
		{name: "kernel path exists", toml: "[hypervisor]\nkernel = \"" + kernel + "\"\n"},
		{name: "wrong type names the key", toml: "[hypervisor]\nmemory_mib = \"lots\"\n", errPart: []string{"memory_mib"}},
		{name: "unknown key is named", toml: "[hypervisor]\nmemory_mb = 512\n", errPart: []string{"hypervisor.memory_mb", "unknown"}},
		{name: "unknown table is named", toml: "[hypervisr]\npath = \"x\"\n", errPart: []string{"hypervisr"}},
		{name: "a bad user_range beside one user", toml: "[hypervisor]\nuser = \"65534:65534\"\nuser_range = \"5:5\"\n", errPart: []string{"hypervisor.user_range", "below 65536"}},
		{name: "a key in another case is named", toml: "[hypervisor]\nVCPUs = 3\n", errPart: []string{"hypervisor.VCPUs", "lower case"}},
		{name: "a table in another case is named", toml: "[Hypervisor]\nvcpus = 3\n", errPart: []string{"[Hypervisor]", "lower case"}},
		{name: "a dotted key in another case is named", toml: "Agent.debug = true\n", errPart: []string{"Agent", "lower case"}},
		{name: "bad duration", toml: "[agent]\ndial_timeout = \"soon\"\n", errPart: []string{"dial_timeout", "duration"}},
		{name: "accelerator enum", toml: "[hypervisor]\naccelerator = \"xen\"\n", errPart: []string{"hypervisor.accelerator", "\"tcg\""}},
		{name: "vcpus range", toml: "[hypervisor]\nvcpus = 0\n", errPart: []string{"hypervisor.vcpus", "1 to 64"}},
		{name: "memory range", toml: "[hypervisor]\nmemory_mib = 16\n", errPart: []string{"hypervisor.memory_mib", "64"}},
		{name: "vsock enum", toml: "[vsock]\nmode = \"tcp\"\n", errPart: []string{"vsock.mode"}},
		{name: "missing kernel reported at load", toml: "[hypervisor]\nkernel = \"/nonexistent/vmlinuz\"\n", errPart: []string{"hypervisor.kernel", "/nonexistent/vmlinuz", "make image"}},
		{name: "missing QEMU binary", toml: "[hypervisor]\npath = \"/nonexistent/qemu\"\n", errPart: []string{"hypervisor.path", "/nonexistent/qemu", "qemu-system-x86"}},
		{name: "missing initrd reported at load", toml: "[hypervisor]\ninitrd = \"/nonexistent/initrd.img\"\n", errPart: []string{"hypervisor.initrd", "make image"}},
		{name: "kernel_params wrong type", toml: "[hypervisor]\nkernel_params = \"quiet\"\n", errPart: []string{"kernel_params"}},
		{name: "stop_timeout zero", toml: "[hypervisor]\nstop_timeout = \"0s\"\n", errPart: []string{"hypervisor.stop_timeout"}},
		{name: "missing virtiofsd", toml: "[shared_fs]\nvirtiofsd = \"/nonexistent/virtiofsd\"\n", errPart: []string{"shared_fs.virtiofsd", "qemu-system-common"}},
		{name: "cache enum", toml: "[shared_fs]\ncache = \"sometimes\"\n", errPart: []string{"shared_fs.cache", "\"always\""}},
		{name: "debug wrong type", toml: "[agent]\ndebug = \"yes\"\n", errPart: []string{"agent.debug"}},
		{name: "log level", toml: "[runtime]\nlog_level = \"loud\"\n", errPart: []string{"runtime.log_level", "debug"}},
		{name: "annotation outside io.kiln", toml: "[runtime]\nenable_annotations = [\"io.katacontainers.x\"]\n", errPart: []string{"runtime.enable_annotations", "io.kiln."}},
		{name: "relative state dir", toml: "[runtime]\nstate_dir = \"run\"\n", errPart: []string{"runtime.state_dir", "absolute"}},
		{name: "state dir too long for its sockets", toml: "[runtime]\nstate_dir = \"/" + strings.Repeat("d", 63) + "\"\n", errPart: []string{"runtime.state_dir", "at most 63"}},
		{name: "kernel parameter that ends the kernel's", toml: "[hypervisor]\nkernel_params = [\"quiet\", \"--\"]\n", errPart: []string{"hypervisor.kernel_params", `"--"`}},
		{name: "fast start from a template", toml: "[hypervisor]\nfast_start = \"template\"\ntemplate_dir = \"/dev/shm/t\"\n", check: func(t *testing.T, c Config) {
			if c.Hypervisor.FastStart != FastStartTemplate || c.Hypervisor.TemplateDir != "/dev/shm/t" || c.Hypervisor.TemplateMax != DefaultTemplateMax {
				t.Errorf("hypervisor %+v", c.Hypervisor)
			}
		}},
		{name: "fast start enum", toml: "[hypervisor]\nfast_start = \"snapshot\"\n", errPart: []string{"hypervisor.fast_start", "\"template\""}},
		{name: "template bound", toml: "[hypervisor]\ntemplate_max = 0\n", errPart: []string{"hypervisor.template_max", "1 to 1024"}},
		{name: "spare pool", toml: "[hypervisor]\nspare_pool = 4\n", check: func(t *testing.T, c Config) {
			if c.Hypervisor.SparePool != 4 || !c.Hypervisor.SpareOn() {
				t.Errorf("hypervisor %+v", c.Hypervisor)
			}
		}},
		{name: "empty spare pool", toml: "[hypervisor]\nspare_pool = 0\n", errPart: []string{"hypervisor.spare_pool = 0", "1 to 16", "spare = false"}},
		{name: "spare pool bound", toml: "[hypervisor]\nspare_pool = 17\n", errPart: []string{"hypervisor.spare_pool = 17", "1 to 16"}},
		{name: "relative template dir", toml: "[hypervisor]\nfast_start = \"template\"\ntemplate_dir = \"tpl\"\n", errPart: []string{"hypervisor.template_dir", "absolute"}},
		{name: "negative timeout", toml: "[agent]\nrequest_timeout = \"-1s\"\n", errPart: []string{"agent.request_timeout"}},
		{name: "clock sync off", toml: "[agent]\nclock_sync = \"0s\"\n", check: func(t *testing.T, c Config) {
			if c.Agent.ClockSync != 0 || Default().Agent.ClockSync.Std() != time.Minute {
				t.Errorf("agent %+v, default %+v", c.Agent, Default().Agent)
			}
		}},
		{name: "clock sync too often", toml: "[agent]\nclock_sync = \"500ms\"\n", errPart: []string{"agent.clock_sync", "at least"}},
		{name: "negative clock sync", toml: "[agent]\nclock_sync = \"-1m\"\n", errPart: []string{"agent.clock_sync"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "config.toml")
			if err := os.WriteFile(path, []byte(tt.toml), 0o644); err != nil {
				t.Fatal(err)
			}
			c, err := Load(path)
			if len(tt.errPart) > 0 {
				if err == nil {
					t.Fatal("no error")
				}
				for _, p := range append(tt.errPart, path) {
					if !strings.Contains(err.Error(), p) {
						t.Errorf("error does not mention %q: %v", p, err)
					}
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if c.Source != path {
				t.Errorf("source %q, want %q", c.Source, path)
			}
			if tt.check != nil {
				tt.check(t, c)
			}
		})
	}
}

func TestResolutionOrder(t *testing.T) {
	dir := t.TempDir()
	system := filepath.Join(dir, "system.toml")
	explicit := filepath.Join(dir, "explicit.toml")
	write := func(path, body string) {
		if err := os.WriteFile(path, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	c, err := load("", "", system)
	if err != nil || c.Source != "" || c.Hypervisor.VCPUs != Default().Hypervisor.VCPUs {
		t.Fatalf("no files: want defaults, got %+v, %v", c, err)
	}
	write(system, "[hypervisor]\nvcpus = 2\n")
	c, err = load("", "", system)
	if err != nil || c.Source != system || c.Hypervisor.VCPUs != 2 {
		t.Fatalf("system file: got source %q vcpus %d, %v", c.Source, c.Hypervisor.VCPUs, err)
	}
	write(explicit, "[hypervisor]\nvcpus = 3\n")
	c, err = load(explicit, "", system)
	if err != nil || c.Source != explicit || c.Hypervisor.VCPUs != 3 {
		t.Fatalf("explicit file: got source %q vcpus %d, %v", c.Source, c.Hypervisor.VCPUs, err)
	}
	if _, err := load(filepath.Join(dir, "missing.toml"), "", system); err == nil || !strings.Contains(err.Error(), "missing.toml") {
		t.Fatalf("missing explicit file: %v", err)
	}
	env := filepath.Join(dir, "env.toml")
	write(env, "[hypervisor]\nvcpus = 4\n")
	c, err = load("", env, system)
	if err != nil || c.Source != env || c.Hypervisor.VCPUs != 4 {
		t.Fatalf("%s file over the system file: got source %q vcpus %d, %v", PathEnv, c.Source, c.Hypervisor.VCPUs, err)
	}
	c, err = load(explicit, env, system)
	if err != nil || c.Source != explicit {
		t.Fatalf("runtime options over %s: got source %q, %v", PathEnv, c.Source, err)
	}
	if _, err := load("", filepath.Join(dir, "gone.toml"), system); err == nil || !strings.Contains(err.Error(), "gone.toml") {
		t.Fatalf("missing %s file: want an error naming it, got %v", PathEnv, err)
	}
	if _, err := load("", "relative.toml", system); err == nil || !strings.Contains(err.Error(), PathEnv) {
		t.Fatalf("relative %s: want an error naming the variable, got %v", PathEnv, err)
	}
}

func TestResolveAssets(t *testing.T) {
	dir := t.TempDir()
	c := Default()
	c.Hypervisor.Kernel = filepath.Join(dir, "vmlinuz")
	if _, err := c.ResolveAssets(); err == nil || !strings.Contains(err.Error(), "together") {
		t.Fatalf("kernel without initrd: %v", err)
	}
	c.Hypervisor.Initrd = filepath.Join(dir, "initrd.img")
	if _, err := c.ResolveAssets(); err == nil || !strings.Contains(err.Error(), "make image") {
		t.Fatalf("missing files: %v", err)
	}
	for _, f := range []string{c.Hypervisor.Kernel, c.Hypervisor.Initrd} {
		if err := os.WriteFile(f, nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	a, err := c.ResolveAssets()
	if err != nil || a.Kernel != c.Hypervisor.Kernel || a.Initrd != c.Hypervisor.Initrd || a.AgentImage != "" {
		t.Fatalf("got %+v, %v", a, err)
	}
	// The agent image is used when it is beside the initramfs.
	img := filepath.Join(dir, AgentImageFile)
	if err := os.WriteFile(img, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if a, err = c.ResolveAssets(); err != nil || a.AgentImage != img {
		t.Fatalf("with %s: got %+v, %v", img, a, err)
	}
}

// A boot looks at explicitly configured assets once: Load's Validate did, so ResolveAssets trusts those paths, and
// only those.
func TestResolveAssetsTrustsWhatLoadValidated(t *testing.T) {
	dir := t.TempDir()
	kernel, initrd := filepath.Join(dir, "vmlinuz"), filepath.Join(dir, "initrd.img")
	for _, f := range []string{kernel, initrd} {
		if err := os.WriteFile(f, nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	path := filepath.Join(dir, "config.toml")
	if err := os.WriteFile(path, []byte("[hypervisor]\nkernel = \""+kernel+"\"\ninitrd = \""+initrd+"\"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	c, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{kernel, initrd} {
		if err := os.Remove(f); err != nil {
			t.Fatal(err)
		}
	}
	if a, err := c.ResolveAssets(); err != nil || a.Kernel != kernel || a.Initrd != initrd {
		t.Errorf("validated paths: got %+v, %v", a, err)
	}
	c.Hypervisor.Kernel += ".other"
	if _, err := c.ResolveAssets(); err == nil || !strings.Contains(err.Error(), "make image") {
		t.Errorf("a path changed after Load was not looked at: %v", err)
	}
}

func TestSettingsSayWhereValuesCameFrom(t *testing.T) {
	path := filepath.Join(t.TempDir(), "config.toml")
	if err := os.WriteFile(path, []byte("[hypervisor]\nvcpus = 2\n[agent]\ndial_timeout = \"5s\"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	c, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	settings, err := c.Settings()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]Setting{}
	for _, s := range settings {
		got[s.Key] = s
	}
	for key, want := range map[string]Setting{
		"hypervisor.vcpus":       {Value: "2", Source: path},
		"agent.dial_timeout":     {Value: "'5s'", Source: path},
		"hypervisor.memory_mib":  {Value: "256", Source: "default"},
		"shared_fs.cache":        {Value: "'auto'", Source: "default"},
		"runtime.state_dir":      {Value: "'/run/kiln'", Source: "default"},
		"hypervisor.accelerator": {Value: "'auto'", Source: "default"},
	} {
		s, ok := got[key]
		if !ok {
			t.Errorf("no setting %s", key)
			continue
		}
		if s.Value != want.Value || s.Source != want.Source {
			t.Errorf("%s = %s from %s, want %s from %s", key, s.Value, s.Source, want.Value, want.Source)
		}
	}
}

// The shipped file documents every key with its default: uncommenting every key line gives the defaults, and
// no key is missing from it.
func TestShippedFileDocumentsEveryKey(t *testing.T) {
	var b strings.Builder
	for _, line := range strings.Split(string(Shipped), "\n") {
		if rest, ok := strings.CutPrefix(line, "# "); ok && strings.Contains(rest, " = ") {
			line = rest
		}
		b.WriteString(line + "\n")
	}
	got, _, err := parse([]byte(b.String()))
	if err != nil {
		t.Fatalf("shipped file with every key uncommented: %v", err)
	}
	gotSettings, err := got.Settings()
	if err != nil {
		t.Fatal(err)
	}
	wantSettings, err := Default().Settings()
	if err != nil {
		t.Fatal(err)
	}
	keys, err := fileKeys([]byte(b.String()))
	if err != nil {
		t.Fatal(err)
	}
	if len(gotSettings) != len(wantSettings) {
		t.Fatalf("%d settings, want %d", len(gotSettings), len(wantSettings))
	}
	for i, w := range wantSettings {
		if gotSettings[i].Key != w.Key || gotSettings[i].Value != w.Value {
			t.Errorf("shipped %s = %s, default %s = %s", gotSettings[i].Key, gotSettings[i].Value, w.Key, w.Value)
		}
		if !keys[w.Key] {
			t.Errorf("key %s is not documented in config.toml", w.Key)
		}
	}
}

func TestResolveUser(t *testing.T) {
	for _, tc := range []struct {
		in, userRange string
		want          QEMUUser
		ok            bool
		errPart       string
	}{
		{in: "", ok: false},
		{in: "65534:65534", want: QEMUUser{UID: 65534, GID: 65534}, ok: true},
		{in: "4242:4343", want: QEMUUser{UID: 4242, GID: 4343}, ok: true},
		{in: "4242", want: QEMUUser{UID: 4242, GID: 4242}, ok: true},
		{in: "per-vm", want: QEMUUser{Range: IDRange{1879048192, 65536}}, ok: true},
		{in: "per-vm", userRange: "200000:10", want: QEMUUser{Range: IDRange{200000, 10}}, ok: true},
		{in: "per-vm", userRange: " 200000:10 ", want: QEMUUser{Range: IDRange{200000, 10}}, ok: true},
		{in: "per-vm", userRange: "4294967294:1", want: QEMUUser{Range: IDRange{4294967294, 1}}, ok: true},
		{in: "per-vm", userRange: "200000", errPart: "first:count"},
		{in: "per-vm", userRange: "", errPart: "first:count"},
		{in: "per-vm", userRange: "x:10", errPart: "first id"},
		{in: "per-vm", userRange: "200000:0", errPart: "count"},
		{in: "per-vm", userRange: "200000:-1", errPart: "count"},
		{in: "per-vm", userRange: "0:10", errPart: "root"},
		{in: "per-vm", userRange: "4294967294:2", errPart: "4294967295"},
		{in: "per-vm", userRange: "60000:10000", errPart: "below 65536"},
		{in: "per-vm", userRange: "65535:10", errPart: "below 65536"},
		{in: "per-vm", userRange: "65536:10", want: QEMUUser{Range: IDRange{65536, 10}}, ok: true},
		{in: "root", errPart: "must not run as root"},
		{in: "0:0", errPart: "must not run as root"},
		{in: "no-such-user-kiln", errPart: "no-such-user-kiln"},
	} {
		h := Hypervisor{User: tc.in, UserRange: tc.userRange}
		if tc.in == QEMUUserPerVM && tc.userRange == "" && tc.errPart == "" {
			h.UserRange = Default().Hypervisor.UserRange
		}
		u, ok, err := h.ResolveUser()
		if tc.errPart != "" {
			if err == nil || !strings.Contains(err.Error(), tc.errPart) || !strings.Contains(err.Error(), "hypervisor.user") {
				t.Errorf("%q %q: err %v, want one naming hypervisor.user and %q", tc.in, tc.userRange, err, tc.errPart)
			}
			continue
		}
		if err != nil || ok != tc.ok || u != tc.want {
			t.Errorf("%q %q: %+v %v %v, want %+v %v", tc.in, tc.userRange, u, ok, err, tc.want, tc.ok)
		}
	}
}

func TestMemoryLayout(t *testing.T) {
	for _, tc := range []struct {
		name              string
		mem, boot, max    int
		wantBoot, wantRAM int
	}{
		{"cannot grow", 384, 256, 0, 384, 384},
		{"a pod's limit added", 768, 256, 8192, 256, 8192},
		{"rounded up to blocks", 300, 200, 8192, 256, 8192},
		{"a pod past the ceiling", 10000, 256, 8192, 256, 10112},
		{"unsized", 256, 0, 8192, 256, 8192},
		{"booting past the PCI hole", 4096, 3072, 8192, 4096, 4096},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := Hypervisor{MemoryMiB: tc.mem, BootMemoryMiB: tc.boot, MemoryMaxMiB: tc.max}
			boot, ram := h.MemoryLayout()
			if boot != tc.wantBoot || ram != tc.wantRAM {
				t.Errorf("MemoryLayout = %d, %d; want %d, %d", boot, ram, tc.wantBoot, tc.wantRAM)
			}
		})
	}
}

func TestCPULayout(t *testing.T) {
	for _, tc := range []struct {
		name               string
		vcpus, boot, most  int
		wantBoot, wantMost int
	}{
		{"cannot grow", 3, 2, 0, 3, 3},
		{"a pod's limit added", 3, 2, 8, 2, 8},
		{"unsized", 2, 0, 8, 2, 8},
		{"a pod past the ceiling", 12, 2, 8, 2, 12},
		{"no more than the guest kernel's", 100, 2, 8, 2, MaxVCPUsMax},
		{"a ceiling no higher than the boot", 2, 2, 2, 2, 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := Hypervisor{VCPUs: tc.vcpus, BootVCPUs: tc.boot, VCPUsMax: tc.most}
			if boot, most := h.CPULayout(); boot != tc.wantBoot || most != tc.wantMost {
				t.Errorf("CPULayout = %d, %d; want %d, %d", boot, most, tc.wantBoot, tc.wantMost)
			}
		})
	}
}
