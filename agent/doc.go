// Package agent is the Kiln guest agent: it runs inside the guest as PID 1,
// prepares the guest (mounts, the shared directory, reaping orphans) and serves the
// agent API (proto/agent/v1) with ttrpc over vsock.
//
// It owns everything the guest does on the host's behalf. It must not know
// about QEMU, the host, the vsock backend or how the guest was booted: it only
// sees a Linux kernel, its command line and an initramfs.
//
// The pieces are exported so that other guest programs (such as the
// integration test guest) can reuse them: Run is the whole life of PID 1,
// Init prepares the guest, NewServer serves the API on any net.Listener.
package agent
