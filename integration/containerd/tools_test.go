package containerd

import (
	"os"
	"path/filepath"
	"regexp"
	"testing"
)

// The runc the harness checks for is the one the tools module builds.
func TestRuncVersionMatchesToolsModule(t *testing.T) {
	b, err := os.ReadFile(filepath.Join(RepoRoot(t), "integration", "containerd", "tools", "go.mod"))
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^\s*(?:require\s+)?github\.com/opencontainers/runc\s+v(\S+)`).FindSubmatch(b)
	if m == nil {
		t.Fatal("tools/go.mod does not require github.com/opencontainers/runc")
	}
	if string(m[1]) != RuncVersion {
		t.Errorf("tools/go.mod requires runc v%s, RuncVersion is %s", m[1], RuncVersion)
	}
}

// The pinned containerd's binaries keep their plain names; another version's carry the version.
func TestToolsForNames(t *testing.T) {
	if got := ToolsFor("/t", ContainerdVersion); got.Containerd != "/t/containerd" || got.Ctr != "/t/ctr" {
		t.Errorf("ToolsFor(%s) = %+v", ContainerdVersion, got)
	}
	got := ToolsFor("/t", ContainerdSmokeVersion)
	if got.Containerd != "/t/containerd-"+ContainerdSmokeVersion || got.Ctr != "/t/ctr-"+ContainerdSmokeVersion {
		t.Errorf("ToolsFor(%s) = %+v", ContainerdSmokeVersion, got)
	}
	if got.RuncShim != "/t/containerd-shim-runc-v2" || got.Runc != "/t/runc" {
		t.Errorf("ToolsFor(%s) shares runc and its shim: %+v", ContainerdSmokeVersion, got)
	}
}
