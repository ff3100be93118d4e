// Command kiln-agent is the Kiln guest agent, run by the guest kernel as
// PID 1 (/init in the guest's initramfs). Everything it does lives in package
// agent; this file only carries the build version.
package main

import (
	"context"

	"github.com/kiln-runtime/kiln/agent"
)

// version is set at build time: -ldflags '-X main.version=...'.
var version = "dev"

func main() {
	agent.Run(context.Background(), agent.Config{Version: version})
}
