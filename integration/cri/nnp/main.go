// Command nnp prints its effective uid. The harness's stand-in for critest's nonewprivs image installs it
// setuid root: run as uid 1000 it prints "Effective uid: 0" unless no_new_privs stops the setuid bit, when it
// prints "Effective uid: 1000".
package main

import (
	"fmt"
	"os"
)

func main() {
	fmt.Printf("Effective uid: %d\n", os.Geteuid())
}
