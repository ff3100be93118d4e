package portforward

import (
	"fmt"
	"os"

	"github.com/kiln-runtime/kiln/netns"
)

// Probe reports whether this host can steer port-forward connections: it attaches the program to a network
// namespace of its own, made for the purpose, and removes both again.
func Probe() error {
	ns, err := newNamespace()
	if err != nil {
		return err
	}
	defer ns.Close()
	s, err := steer(fmt.Sprintf("/proc/self/fd/%d", ns.Fd()))
	if err != nil {
		return err
	}
	s.Close()
	return nil
}

// newNamespace makes a network namespace and returns a descriptor of it, which keeps it alive.
func newNamespace() (*os.File, error) {
	var f *os.File
	err := netns.DoNew(func(path string) error {
		var err error
		f, err = os.Open(path)
		return err
	})
	if err != nil {
		if f != nil {
			f.Close()
		}
		return nil, err
	}
	return f, nil
}
