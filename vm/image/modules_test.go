package image

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

func TestLoadOrder(t *testing.T) {
	graph := map[string][]string{
		"virtio_ring":                       {},
		"virtio":                            {},
		"virtio_mmio":                       {"virtio", "virtio_ring"},
		"vsock":                             {},
		"vmw_vsock_virtio_transport":        {"vmw_vsock_virtio_transport_common", "virtio", "virtio_ring", "vsock"},
		"vmw_vsock_virtio_transport_common": {"vsock"},
		"vport_gre":                         {"openvswitch"}, // file spelled vport-gre.ko
		"openvswitch":                       {"nf-conntrack"},
		"nf_conntrack":                      {},
		"a":                                 {"b"},
		"b":                                 {"c"},
		"c":                                 {"a"},
		"self":                              {"self"},
		"uses_cycle":                        {"a"},
	}
	depends := func(name string) ([]string, error) {
		d, ok := graph[name]
		if !ok {
			return nil, fmt.Errorf("module %s not found", name)
		}
		return d, nil
	}
	for _, tc := range []struct {
		name      string
		requested []string
		want      []string
		wantErr   string
	}{
		{name: "none", requested: nil, want: nil},
		{name: "empty names skipped", requested: []string{"", " "}, want: nil},
		{name: "leaf", requested: []string{"vsock"}, want: []string{"vsock"}},
		{name: "chain and diamond", requested: []string{"vmw_vsock_virtio_transport"},
			want: []string{"vsock", "vmw_vsock_virtio_transport_common", "virtio", "virtio_ring", "vmw_vsock_virtio_transport"}},
		{name: "shared deps once, request order kept", requested: []string{"virtio_mmio", "vmw_vsock_virtio_transport"},
			want: []string{"virtio", "virtio_ring", "virtio_mmio", "vsock", "vmw_vsock_virtio_transport_common", "vmw_vsock_virtio_transport"}},
		{name: "requested twice", requested: []string{"vsock", "vsock"}, want: []string{"vsock"}},
		{name: "dash and underscore are one module", requested: []string{"vport-gre", "vport_gre"},
			want: []string{"nf_conntrack", "openvswitch", "vport_gre"}},
		{name: "missing", requested: []string{"nope"}, wantErr: "module nope not found"},
		{name: "cycle", requested: []string{"a"}, wantErr: "cycle: a -> b -> c -> a"},
		{name: "cycle reached through a dependency", requested: []string{"uses_cycle"}, wantErr: "cycle: a -> b -> c -> a"},
		{name: "self cycle", requested: []string{"self"}, wantErr: "cycle: self -> self"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := LoadOrder(tc.requested, depends)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("error %v, want one containing %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("order %q, want %q", got, tc.want)
			}
		})
	}
}

// writeFakeTree lays out a module tree like a Debian package's, with one
// module compressed and one spelled with '-', from synthetic ELF files.
func writeFakeTree(t *testing.T) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "lib", "modules", "6.1.0-0-test")
	files := map[string][]byte{
		"kernel/drivers/virtio/virtio.ko":      fakeModule("name=virtio", "depends="),
		"kernel/drivers/virtio/virtio_ring.ko": fakeModule("name=virtio_ring", "depends="),
		"kernel/drivers/virtio/virtio_mmio.ko": fakeModule("license=GPL", "depends=virtio,virtio_ring", "name=virtio_mmio"),
		"kernel/net/vport-gre.ko":              fakeModule("name=vport_gre", "depends=virtio-mmio"),
		"kernel/net/loop_a.ko":                 fakeModule("depends=loop_b"),
		"kernel/net/loop_b.ko":                 fakeModule("depends=loop_a"),
		"kernel/net/needs_builtin.ko":          fakeModule("depends=virtio"),
		"kernel/bad/notelf.ko":                 []byte("not an ELF file"),
	}
	for name, data := range files {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "modules.builtin"), []byte("kernel/drivers/block/virtio_blk.ko\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := exec.LookPath("xz"); err == nil {
		// Compress virtio_ring as a kernel built with CONFIG_MODULE_COMPRESS_XZ would.
		if out, err := exec.Command("xz", "--check=crc32", filepath.Join(dir, "kernel/drivers/virtio/virtio_ring.ko")).CombinedOutput(); err != nil {
			t.Fatalf("xz: %v %s", err, out)
		}
	}
	return dir
}

func TestResolveFakeTree(t *testing.T) {
	ix, err := OpenModules(writeFakeTree(t))
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	for _, tc := range []struct {
		name      string
		requested []string
		want      []string
		wantErr   string
	}{
		{name: "deps first", requested: []string{"vport-gre"}, want: []string{"virtio", "virtio_ring", "virtio_mmio", "vport_gre"}},
		{name: "builtin request skipped", requested: []string{"virtio_blk", "virtio"}, want: []string{"virtio"}},
		{name: "missing", requested: []string{"virtio", "nosuch"}, wantErr: "module nosuch not found"},
		{name: "cycle", requested: []string{"loop-a"}, wantErr: "cycle: loop_a -> loop_b -> loop_a"},
		{name: "not ELF", requested: []string{"notelf"}, wantErr: "parse ELF"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mods, err := ix.Resolve(ctx, tc.requested)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("error %v, want one containing %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			var got []string
			for _, m := range mods {
				got = append(got, m.Name)
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("order %q, want %q", got, tc.want)
			}
		})
	}
	if m, ok := ix.Lookup("virtio_ring"); ok && strings.HasSuffix(m.Path, ".xz") {
		raw, err := ReadModule(ctx, m.Path)
		if err != nil {
			t.Fatal(err)
		}
		if info, err := ModInfo(raw); err != nil || info["name"] != "virtio_ring" {
			t.Fatalf("modinfo of decompressed module = %v, %v", info, err)
		}
	}
}

// realModulesDir finds a kernel tree extracted by a previous build, in
// KILN_IMAGE_CACHE or the repository's _output/cache.
func realModulesDir(t *testing.T) string {
	t.Helper()
	cache := os.Getenv("KILN_IMAGE_CACHE")
	if cache == "" {
		cache = "../../_output/cache"
	}
	m, _ := filepath.Glob(filepath.Join(cache, "linux-image-*", "lib", "modules", "*"))
	if len(m) == 0 {
		t.Skipf("no extracted kernel under %s (run make image or set KILN_IMAGE_CACHE)", cache)
	}
	return m[len(m)-1]
}

func TestResolveRealModules(t *testing.T) {
	ix, err := OpenModules(realModulesDir(t))
	if err != nil {
		t.Fatal(err)
	}
	mods, err := ix.Resolve(context.Background(), []string{"virtio_mmio", "vmw_vsock_virtio_transport", "virtiofs", "overlay"})
	if err != nil {
		t.Fatal(err)
	}
	pos := map[string]int{}
	for i, m := range mods {
		pos[m.Name] = i
	}
	for _, dep := range [][2]string{
		{"virtio", "virtio_mmio"}, {"virtio_ring", "virtio_mmio"},
		{"vsock", "vmw_vsock_virtio_transport_common"},
		{"vmw_vsock_virtio_transport_common", "vmw_vsock_virtio_transport"},
		{"fuse", "virtiofs"},
	} {
		a, okA := pos[dep[0]]
		b, okB := pos[dep[1]]
		if !okA || !okB || a >= b {
			t.Errorf("%s must load before %s; order %v", dep[0], dep[1], pos)
		}
	}
	// A file name with '-' must resolve through its '_' spelling.
	if _, ok := ix.Lookup("vport_gre"); !ok {
		t.Error("vport-gre.ko not found as vport_gre")
	}
}
