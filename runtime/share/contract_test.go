package share

import (
	"testing"

	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
	"github.com/kiln-runtime/kiln/vm/virtiofs"
)

// The VM layer names the virtio-fs tag without knowing the agent API; the agent mounts the tag the API names.
func TestVirtiofsTagIsTheAgentContract(t *testing.T) {
	if virtiofs.Tag != agentv1.SharedFSTag {
		t.Fatalf("virtiofs.Tag %q, agent mounts %q", virtiofs.Tag, agentv1.SharedFSTag)
	}
}
