// Command containerd-shim-kiln-v2 will be Kiln's containerd runtime v2 shim (io.containerd.kiln.v2). The task
// service is not built yet: until it is, the binary refuses to run rather than pretend to be a shim.
package main

import (
	"fmt"
	"os"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	fmt.Fprintf(os.Stderr, "containerd-shim-kiln-v2 %s: the containerd task service is not implemented yet; use `kiln vm boot` to boot a guest\n", version)
	os.Exit(1)
}
