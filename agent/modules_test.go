package agent

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"
)

func TestParseModuleList(t *testing.T) {
	for _, tc := range []struct {
		name, in string
		want     []string
		wantErr  bool
	}{
		{"empty", "", nil, false},
		{"order kept", "virtio_mmio.ko\nvsock.ko\nvmw_vsock_virtio_transport.ko\n",
			[]string{"virtio_mmio.ko", "vsock.ko", "vmw_vsock_virtio_transport.ko"}, false},
		{"blanks comments and spaces", "# for vsock\n\n  vsock.ko  \r\n", []string{"vsock.ko"}, false},
		{"no final newline", "a.ko", []string{"a.ko"}, false},
		{"subdirectory", "kernel/fs/fuse.ko", []string{"kernel/fs/fuse.ko"}, false},
		{"absolute path refused", "/etc/shadow", nil, true},
		{"escape refused", "../../etc/x.ko", nil, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseModuleList(strings.NewReader(tc.in))
			if (err != nil) != tc.wantErr {
				t.Fatalf("error = %v, want error %v", err, tc.wantErr)
			}
			if !slices.Equal(got, tc.want) {
				t.Errorf("got %q, want %q", got, tc.want)
			}
		})
	}
}

func TestModuleFlags(t *testing.T) {
	for path, want := range map[string]int{
		"vsock.ko":     0,
		"vsock.ko.xz":  unix.MODULE_INIT_COMPRESSED_FILE,
		"vsock.ko.zst": unix.MODULE_INIT_COMPRESSED_FILE,
		"vsock.ko.gz":  unix.MODULE_INIT_COMPRESSED_FILE,
	} {
		if got := moduleFlags(path); got != want {
			t.Errorf("moduleFlags(%q) = %d, want %d", path, got, want)
		}
	}
}

func TestReadModuleListMissingIsEmpty(t *testing.T) {
	names, err := ReadModuleList(filepath.Join(t.TempDir(), "absent"))
	if err != nil || names != nil {
		t.Fatalf("missing module list: %q, %v; want nothing to load", names, err)
	}
}

// A module named in the list but absent from the image must stop the agent
// with the module's path in the error, since the console is all there is to
// debug a guest with.
func TestLoadModuleFilesMissingModuleIsFatal(t *testing.T) {
	dir := t.TempDir()
	list := filepath.Join(dir, "modules")
	if err := os.WriteFile(list, []byte("absent.ko\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	names, err := ReadModuleList(list)
	if err != nil {
		t.Fatal(err)
	}
	err = LoadModuleFiles(logrus.NewEntry(logrus.New()), dir, names)
	if err == nil || !strings.Contains(err.Error(), filepath.Join(dir, "absent.ko")) {
		t.Fatalf("error = %v, want one naming %s", err, filepath.Join(dir, "absent.ko"))
	}
}

func TestSplitModules(t *testing.T) {
	list := []string{"virtio_ring.ko", "vsock.ko", "vmw_vsock_virtio_transport.ko", "fuse.ko", "overlay.ko"}
	for _, tc := range []struct {
		name        string
		list        []string
		split       string
		first, rest []string
	}{
		{"after the named module", list, "vmw_vsock_virtio_transport", list[:3], list[3:]},
		{"last module", list, "overlay", list, nil},
		{"absent: all first", list, "virtiofs", list, nil},
		{"empty list", nil, "vsock", nil, nil},
		{"compressed file and dash spelling", []string{"kernel/a.ko", "kernel/vmw-vsock-virtio-transport.ko.xz", "b.ko"},
			"vmw_vsock_virtio_transport", []string{"kernel/a.ko", "kernel/vmw-vsock-virtio-transport.ko.xz"}, []string{"b.ko"}},
		{"prefix is not a match", []string{"vsock_diag.ko", "vsock.ko", "x.ko"}, "vsock",
			[]string{"vsock_diag.ko", "vsock.ko"}, []string{"x.ko"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			first, rest := SplitModules(tc.list, tc.split)
			if !slices.Equal(first, tc.first) || !slices.Equal(rest, tc.rest) {
				t.Errorf("got %q + %q, want %q + %q", first, rest, tc.first, tc.rest)
			}
		})
	}
}
