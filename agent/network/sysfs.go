package network

import (
	"fmt"
	"os"

	"golang.org/x/sys/unix"

	knetns "github.com/kiln-runtime/kiln/netns"
)

// Sysfs returns a sysfs mounted from inside the pod namespace, made on first use: a sysfs shows the network
// interfaces (class/net) of the namespace of whoever mounted it. A container with a user namespace of its own
// cannot mount one itself, as the pod namespace belongs to the guest's initial user namespace; a bind of the
// guest's /sys would show the guest's interfaces instead of the pod's, which a runc container's does not.
func (p *Pod) Sysfs() (string, error) {
	path, err := p.Path()
	if err != nil {
		return "", err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	dir := p.path + ".sys"
	if p.sysfs {
		return dir, nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("make the pod's sysfs directory: %w", err)
	}
	err = knetns.DoPath(path, func() error {
		return unix.Mount("sysfs", dir, "sysfs", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, "")
	})
	if err != nil {
		return "", fmt.Errorf("mount a sysfs in the pod network namespace: %w", err)
	}
	p.sysfs = true
	return dir, nil
}
