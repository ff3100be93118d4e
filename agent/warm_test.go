package agent

import (
	"testing"

	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"

	agentv1 "github.com/kiln-runtime/kiln/proto/agent/v1"
)

// Every message type of the registry is warmed, and only those.
func TestWarmProtobuf(t *testing.T) {
	types := new(protoregistry.Types)
	if got := warmProtobuf(types); got != 0 {
		t.Errorf("empty registry: warmed %d types", got)
	}
	for _, mt := range []protoreflect.MessageType{
		(&agentv1.CheckRequest{}).ProtoReflect().Type(),
		(&agentv1.CreateContainerRequest{}).ProtoReflect().Type(),
		(&agentv1.GuestInfo{}).ProtoReflect().Type(),
	} {
		if err := types.RegisterMessage(mt); err != nil {
			t.Fatal(err)
		}
	}
	if got := warmProtobuf(types); got != 3 {
		t.Errorf("warmed %d types, want 3", got)
	}
	// The agent's own binary registers the agent API's messages.
	if got := warmProtobuf(protoregistry.GlobalTypes); got < 40 {
		t.Errorf("warmed %d registered types, want the agent API's (40 or more)", got)
	}
}
