package image

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// buildCache returns the kernel cache for tests that run apt and the real
// kernel: KILN_IMAGE_CACHE, or the repository's _output/cache once a build
// has filled it. Tests skip otherwise so that go test never downloads 27 MB
// by surprise.
func buildCache(t *testing.T) string {
	t.Helper()
	if testing.Short() {
		t.Skip("runs apt and reads the real kernel: skipped with -short")
	}
	if _, err := exec.LookPath("apt-cache"); err != nil {
		t.Skip("no apt-cache: not a Debian host")
	}
	cache := os.Getenv("KILN_IMAGE_CACHE")
	if cache == "" {
		cache, _ = filepath.Abs("../../_output/cache")
		if m, _ := filepath.Glob(filepath.Join(cache, "linux-image-*.deb")); len(m) == 0 {
			t.Skip("no kernel cache (set KILN_IMAGE_CACHE or run make image)")
		}
	}
	return cache
}

func TestBuildTwiceSameBytesNoRewrite(t *testing.T) {
	cache := buildCache(t)
	ctx := context.Background()
	dir := t.TempDir()
	initPath := filepath.Join(dir, "init")
	if err := os.WriteFile(initPath, []byte("\x7fELF not really"), 0o755); err != nil {
		t.Fatal(err)
	}
	opts := Options{
		CacheDir: cache, OutDir: filepath.Join(dir, "out"), InitPath: initPath,
		Modules: []string{"virtio_mmio", "vmw_vsock_virtio_transport"}, Compression: CompressGzip,
	}
	first, err := Build(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	if len(first.Written) != 3 {
		t.Fatalf("first build wrote %v, want vmlinuz, kernel-release, initrd.img", first.Written)
	}
	before := map[string][]byte{}
	stamps := map[string]time.Time{}
	for _, p := range first.Written {
		before[p], _ = os.ReadFile(p)
		stamps[p] = mustStat(t, p).ModTime()
	}
	if rel := strings.TrimSpace(string(before[first.ReleaseFile])); rel != first.Kernel.Release ||
		!regexp.MustCompile(`^\d+\.\d+\.\d+-\d+-cloud-amd64$`).MatchString(rel) {
		t.Errorf("kernel-release %q (kernel says %q)", rel, first.Kernel.Release)
	}
	if !bytes.HasPrefix(before[first.Vmlinuz][0x202:], []byte("HdrS")) {
		t.Error("vmlinuz lacks the x86 boot protocol signature")
	}
	// Rebuilding into a second directory must give the same bytes.
	opts2 := opts
	opts2.OutDir = filepath.Join(dir, "out2")
	second, err := Build(ctx, opts2)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(second.Initrd)
	if !bytes.Equal(b, before[first.Initrd]) {
		t.Error("same inputs gave a different initrd")
	}
	// Rebuilding in place must touch nothing.
	third, err := Build(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	if len(third.Written) != 0 {
		t.Errorf("unchanged rebuild rewrote %v", third.Written)
	}
	for p, ts := range stamps {
		if !mustStat(t, p).ModTime().Equal(ts) {
			t.Errorf("%s mtime changed on an unchanged rebuild", p)
		}
	}
	// A changed input rewrites only the initrd.
	opts.Compression = CompressNone
	fourth, err := Build(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	if len(fourth.Written) != 1 || fourth.Written[0] != first.Initrd {
		t.Errorf("compression change rewrote %v, want only %s", fourth.Written, first.Initrd)
	}
}

func TestBuildMissingModuleNamesIt(t *testing.T) {
	cache := buildCache(t)
	dir := t.TempDir()
	initPath := filepath.Join(dir, "init")
	os.WriteFile(initPath, []byte("x"), 0o755)
	_, err := Build(context.Background(), Options{
		CacheDir: cache, OutDir: dir, InitPath: initPath, Modules: []string{"virtio_mmio", "no_such_module"},
	})
	if err == nil || !strings.Contains(err.Error(), "module no_such_module not found") {
		t.Fatalf("error %v, want one naming no_such_module", err)
	}
	if _, err := os.Stat(filepath.Join(dir, InitrdName)); err == nil {
		t.Error("failed build still wrote an initrd")
	}
}

// A built kernel (Kiln's own, everything built in) is installed as given, with its release, and no module
// can be asked of it.
func TestBuildWithBuiltKernel(t *testing.T) {
	dir := t.TempDir()
	initPath := filepath.Join(dir, "init")
	kernel := filepath.Join(dir, "bzImage")
	for p, data := range map[string]string{initPath: "\x7fELF not really", kernel: "not a real bzImage"} {
		if err := os.WriteFile(p, []byte(data), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	for _, tc := range []struct {
		name    string
		release string
		modules []string
		errPart string
	}{
		{name: "installed", release: "6.1.192-kiln"},
		{name: "no release", errPart: "no release given"},
		{name: "modules asked for", release: "6.1.192-kiln", modules: []string{"overlay"}, errPart: "has no modules"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out := filepath.Join(t.TempDir(), "out")
			res, err := Build(context.Background(), Options{
				OutDir: out, InitPath: initPath, KernelImage: kernel, KernelRelease: tc.release, Modules: tc.modules,
				CacheDir: filepath.Join(dir, "no-cache-used"),
			})
			if tc.errPart != "" {
				if err == nil || !strings.Contains(err.Error(), tc.errPart) || !strings.Contains(err.Error(), kernel) {
					t.Fatalf("err = %v, want one naming %s and %q", err, kernel, tc.errPart)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if b, _ := os.ReadFile(filepath.Join(out, VmlinuzName)); string(b) != "not a real bzImage" {
				t.Errorf("vmlinuz = %q, want the built kernel's bytes", b)
			}
			if b, _ := os.ReadFile(filepath.Join(out, KernelReleaseName)); string(b) != tc.release+"\n" {
				t.Errorf("kernel-release = %q", b)
			}
			if len(res.Modules) != 0 {
				t.Errorf("modules %v in the initramfs of a built kernel", res.Modules)
			}
			if _, err := os.Stat(filepath.Join(dir, "no-cache-used")); err == nil {
				t.Error("the Debian kernel cache was used for a built kernel")
			}
		})
	}
}
