package image

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// fakeInputs writes an init and a kernel image (neither real: Build only copies them) and returns their paths.
func fakeInputs(t *testing.T) (initPath, kernel string) {
	t.Helper()
	dir := t.TempDir()
	initPath = filepath.Join(dir, "init")
	kernel = filepath.Join(dir, "bzImage")
	for p, data := range map[string]string{initPath: "\x7fELF not really", kernel: "not a real bzImage"} {
		if err := os.WriteFile(p, []byte(data), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return initPath, kernel
}

func TestBuildTwiceSameBytesNoRewrite(t *testing.T) {
	initPath, kernel := fakeInputs(t)
	dir := t.TempDir()
	opts := Options{
		KernelImage: kernel, KernelRelease: "6.1.192-kiln", OutDir: filepath.Join(dir, "out"), InitPath: initPath,
		Compression: CompressGzip,
	}
	first, err := Build(context.Background(), opts)
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
	if string(before[first.Vmlinuz]) != "not a real bzImage" {
		t.Errorf("vmlinuz = %q, want the kernel image's bytes", before[first.Vmlinuz])
	}
	if rel := string(before[first.ReleaseFile]); rel != "6.1.192-kiln\n" {
		t.Errorf("kernel-release = %q", rel)
	}
	// Rebuilding into a second directory must give the same bytes.
	opts2 := opts
	opts2.OutDir = filepath.Join(dir, "out2")
	second, err := Build(context.Background(), opts2)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(second.Initrd)
	if !bytes.Equal(b, before[first.Initrd]) {
		t.Error("same inputs gave a different initrd")
	}
	// Rebuilding in place must touch nothing.
	third, err := Build(context.Background(), opts)
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
	fourth, err := Build(context.Background(), opts)
	if err != nil {
		t.Fatal(err)
	}
	if len(fourth.Written) != 1 || fourth.Written[0] != first.Initrd {
		t.Errorf("compression change rewrote %v, want only %s", fourth.Written, first.Initrd)
	}
}

// The kernel and its release are required, and a build that fails writes nothing.
func TestBuildNeedsKernelAndRelease(t *testing.T) {
	initPath, kernel := fakeInputs(t)
	for _, tc := range []struct {
		name, kernel, release, errPart string
	}{
		{name: "no kernel", release: "6.1.192-kiln", errPart: "no kernel image given"},
		{name: "no release", kernel: kernel, errPart: "kernel " + kernel + ": no release given"},
		{name: "missing kernel", kernel: kernel + ".absent", release: "6.1.192-kiln", errPart: "read kernel image of 6.1.192-kiln"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out := filepath.Join(t.TempDir(), "out")
			_, err := Build(context.Background(), Options{OutDir: out, InitPath: initPath, KernelImage: tc.kernel, KernelRelease: tc.release})
			if err == nil || !strings.Contains(err.Error(), tc.errPart) {
				t.Fatalf("err = %v, want one containing %q", err, tc.errPart)
			}
			if _, err := os.Stat(filepath.Join(out, InitrdName)); err == nil {
				t.Error("failed build still wrote an initrd")
			}
		})
	}
}

// With AgentImagePath, a build writes the agent image of its init as well, and an unchanged rebuild leaves it alone
// (a rewritten image makes new VM templates).
func TestBuildWritesTheAgentImage(t *testing.T) {
	initPath, kernel := fakeInputs(t)
	out := filepath.Join(t.TempDir(), "out")
	opts := Options{KernelImage: kernel, KernelRelease: "6.1.192-kiln", OutDir: out, InitPath: initPath,
		AgentImagePath: filepath.Join(out, AgentImageName)}
	first, err := Build(context.Background(), opts)
	if err != nil {
		t.Fatal(err)
	}
	if first.AgentImage != opts.AgentImagePath || !slices.Contains(first.Written, opts.AgentImagePath) {
		t.Fatalf("agent image %q, wrote %v", first.AgentImage, first.Written)
	}
	want, err := BuildAgentImage(context.Background(), []byte("\x7fELF not really"), 0)
	if err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(opts.AgentImagePath); !bytes.Equal(got, want) {
		t.Error("the agent image written is not BuildAgentImage's of the init")
	}
	again, err := Build(context.Background(), opts)
	if err != nil {
		t.Fatal(err)
	}
	if len(again.Written) != 0 {
		t.Errorf("unchanged rebuild rewrote %v", again.Written)
	}
}
