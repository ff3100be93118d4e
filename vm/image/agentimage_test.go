package image

import (
	"bytes"
	"context"
	"crypto/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
)

// The agent image holds the binary, byte for byte, as a root-owned executable, and one binary always makes the
// same image (a new image makes new VM templates).
func TestBuildAgentImage(t *testing.T) {
	agent := make([]byte, 300<<10)
	if _, err := rand.Read(agent); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	first, err := BuildAgentImage(ctx, agent, 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(first)%agentImageAlign != 0 || len(first) < len(agent)+1<<20 {
		t.Errorf("image of %d bytes for a %d-byte binary: want whole 2 MiB units with 1 MiB to spare", len(first), len(agent))
	}
	// The second under another umask, as another machine's build may run: the image is the same.
	old := unix.Umask(0o077)
	second, err := BuildAgentImage(ctx, agent, 0)
	unix.Umask(old)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(first, second) {
		t.Error("two builds of one binary differ (the second under umask 077)")
	}
	if later, err := BuildAgentImage(ctx, agent, 1700000000); err != nil || bytes.Equal(first, later) {
		t.Errorf("another SOURCE_DATE_EPOCH made the same image (%v)", err)
	}

	img := filepath.Join(t.TempDir(), "agent.img")
	if err := os.WriteFile(img, first, 0o644); err != nil {
		t.Fatal(err)
	}
	debugfs := func(request string) string {
		out, err := exec.Command("debugfs", "-R", request, img).Output()
		if err != nil {
			t.Fatalf("debugfs %s: %v", request, err)
		}
		return string(out)
	}
	if got := debugfs("cat " + agentv1.AgentImageBinary); got != string(agent) {
		t.Errorf("the image's %s differs from the binary (%d bytes, want %d)", agentv1.AgentImageBinary, len(got), len(agent))
	}
	stat := debugfs("stat " + agentv1.AgentImageBinary)
	for _, want := range []string{"Mode:  0755", "User:     0   Group:     0", "ctime: 0x00000000", "atime: 0x00000000", "mtime: 0x00000000"} {
		if !strings.Contains(stat, want) {
			t.Errorf("%s in the image: no %q in\n%s", agentv1.AgentImageBinary, want, stat)
		}
	}
	if _, err := BuildAgentImage(ctx, nil, 0); err == nil {
		t.Error("no error for an empty binary")
	}
}
