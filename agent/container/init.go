package container

import (
	"os"

	// Without it the cgroup managers refuse device rules, and every spec
	// has some (runc's binary imports it the same way).
	_ "github.com/opencontainers/cgroups/devices"
	"github.com/opencontainers/runc/libcontainer"
)

// IsInitReexec says whether this process is libcontainer re-executing the
// agent's binary as a container's init ("<argv0> init" with the sync pipes
// in its environment). The environment check keeps a stray "init" word on
// the kernel command line (passed to PID 1 as an argument) from being
// taken for it.
func IsInitReexec() bool {
	return len(os.Args) > 1 && os.Args[1] == "init" && os.Getenv("_LIBCONTAINER_INITPIPE") != ""
}

// RunInit is the container init's whole life: it sets the container up
// and execs the user's program. It never returns.
func RunInit() {
	libcontainer.Init()
}
