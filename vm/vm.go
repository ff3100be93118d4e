// Package vm defines the microVM lifecycle that the runtime depends on. Backends (vm/qemu) implement Machine;
// device mechanisms live in sub-packages (guestmem, virtqueue, vhostuser, vsock). This package knows nothing of
// containers, containerd or the agent's API: it boots a guest and gives byte streams to its vsock ports.
package vm

import (
	"context"
	"errors"
	"net"
)

// ErrOOMKilled is in a Machine's ExitError when the host's OOM killer ended the VM (its VMM or a helper process).
var ErrOOMKilled = errors.New("the host's OOM killer ended the VM")

// Machine is one running microVM.
type Machine interface {
	// ID is the machine's identifier, unique on the host.
	ID() string
	// Start boots the guest. On error everything it set up has been torn down again.
	Start(ctx context.Context) error
	// Wait blocks until the VM has exited and its host resources are released.
	Wait(ctx context.Context) error
	// Stop asks the VMM to quit, then kills it after the configured timeout, and releases every host resource.
	// It is safe to call more than once and after the VM exited on its own.
	Stop(ctx context.Context) error
	// Pause stops the guest's vCPUs; Resume restarts them.
	Pause(ctx context.Context) error
	Resume(ctx context.Context) error
	// DialVsock opens a stream to a port the guest listens on.
	DialVsock(ctx context.Context, port uint32) (net.Conn, error)
	// Exited is closed once the VMM process has gone.
	Exited() <-chan struct{}
	// ExitError describes how the VMM ended, with its diagnostics; nil while it runs.
	ExitError() error
	// Diagnostics returns what helps explain a failed boot: the VMM's error output and the guest console's last
	// lines. Empty when there is nothing.
	Diagnostics() string
}
