// Command containerd-shim-kiln-v2 is Kiln's containerd runtime v2 shim (io.containerd.kiln.v2): containerd's
// pkg/shim runs it with Kiln's manager (runtime/manager) and task service (runtime/task).
package main

import (
	"context"
	"fmt"
	"os"

	"github.com/containerd/containerd/v2/pkg/shim"
	"github.com/sirupsen/logrus"

	"github.com/kiln-runtime/kiln/runtime/manager"
	"github.com/kiln-runtime/kiln/runtime/network"
	"github.com/kiln-runtime/kiln/runtime/sandbox"
	"github.com/kiln-runtime/kiln/runtime/spare"
	"github.com/kiln-runtime/kiln/runtime/task"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	// The shim re-executes itself to hold a pod's network namespace for OCI hooks.
	network.RunHolderIfAsked()
	// The holds a shim server's `start` passed it (runtime/spare), taken before the server starts anything.
	held := spare.Inherited()
	var sp *task.Spare
	if len(os.Args) > 1 && os.Args[1] == spare.SpareArg {
		// A spare's VM has an agent before shim.Run sets the log up (task.Register's plugin bounds it again then).
		sandbox.QuietGuestNoise(logrus.StandardLogger())
		var err error
		if sp, err = runSpare(os.Args[2:]); err != nil {
			fmt.Fprintf(os.Stderr, "%s: spare shim: %s\n", manager.RuntimeName, err)
			os.Exit(1)
		}
	}
	task.Register(version, sp, held)
	s := manager.New(version)
	// containerd before 2.3 runs `start` in a way pkg/shim no longer serves (legacy.go).
	if handled, err := startLegacy(context.Background(), s, os.Args[1:], os.Stdout); handled || err != nil {
		if err != nil {
			fmt.Fprintf(os.Stderr, "%s: %s", s.Name(), err)
			os.Exit(1)
		}
		return
	}
	// The shim waits for its own children (QEMU, virtiofsd, loggers) with os/exec: containerd's reaper would
	// take their exit statuses first, and no container process is a child of the shim to adopt.
	shim.RunShim(context.Background(), s, func(c *shim.Config) {
		c.NoReaper = true
		c.NoSubreaper = true
	})
}
