package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// Without --kernel or --kernel-release kiln-image refuses to build, naming the missing flag and where the guest
// kernel comes from: there is no other kernel to fall back to.
func TestKernelFlagsRequired(t *testing.T) {
	dir := t.TempDir()
	initPath := filepath.Join(dir, "init")
	if err := os.WriteFile(initPath, []byte("\x7fELF not really"), 0o755); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "out")
	for _, tc := range []struct {
		name    string
		args    []string
		missing string
	}{
		{name: "neither", args: nil, missing: "--kernel "},
		{name: "no release", args: []string{"--kernel", filepath.Join(dir, "bzImage")}, missing: "--kernel-release "},
		{name: "no kernel", args: []string{"--kernel-release", "6.1.192-kiln"}, missing: "--kernel "},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := run(append([]string{"-q", "--init", initPath, "--out", out}, tc.args...))
			if err == nil {
				t.Fatal("built an image without a kernel")
			}
			for _, part := range []string{tc.missing + "is required", "vm/image/kernel/build.sh", "make image"} {
				if !strings.Contains(err.Error(), part) {
					t.Errorf("err = %q, want it to contain %q", err, part)
				}
			}
			if _, err := os.Stat(out); err == nil {
				t.Error("a refused build created the output directory")
			}
		})
	}
}
