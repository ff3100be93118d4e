package containerd

import (
	"os"
	"path/filepath"
	"runtime"
	"testing"
)

// RepoRoot is the module root, two levels above this package: where the tests of a private containerd (this
// package's and integration/cri's) find Kiln's build and build their tools.
func RepoRoot(t testing.TB) string {
	t.Helper()
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		t.Fatal("cannot locate the test source")
	}
	return filepath.Clean(filepath.Join(filepath.Dir(file), "..", ".."))
}

// RequireRoot skips a test of a private containerd when not run as root, and under -short; suite names the tests
// in the reason ("containerd", "CRI").
func RequireRoot(t testing.TB, suite string) {
	t.Helper()
	if testing.Short() {
		t.Skipf("%s integration test: not with -short", suite)
	}
	if os.Geteuid() != 0 {
		t.Skipf("%s integration tests need root", suite)
	}
}
