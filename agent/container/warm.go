package container

import (
	"encoding/json"
	"fmt"

	"github.com/opencontainers/runc/libcontainer"
	"github.com/opencontainers/runc/libcontainer/configs"
	"github.com/opencontainers/runc/libcontainer/specconv"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// Warm builds what the service's libraries build at first use and keep: encoding/json's encoders and field tables
// of the runtime spec and process (which requests carry), and of libcontainer's configuration and state (which
// it writes for each container), and specconv's tables. A template guest calls it before its save, so that its
// clones inherit them (agent.Config.Warm).
func Warm() error {
	for _, v := range []any{&specs.Spec{}, &specs.Process{}, &configs.Config{}, &libcontainer.State{}} {
		if _, err := json.Marshal(v); err != nil {
			return fmt.Errorf("warm encoding/json for %T: %w", v, err)
		}
	}
	_ = specconv.KnownMountOptions()
	return nil
}
