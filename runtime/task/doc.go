// Package task is Kiln's containerd task service (task API v3): it turns containerd's requests for one shim
// (one group of containers) into one microVM, a shared directory holding the containers' root file systems, and
// the guest agent's container API; it publishes containerd's task events, keeps each process's lifecycle as an
// explicit state machine, and relays stdio between containerd's fifos or log URIs and the guest.
//
// It builds on runtime/sandbox (the VM and its agent), runtime/share (the shared directory), runtime/container
// (host handles on the guest's containers and processes) and runtime/stdio (the streams); it knows nothing of
// QEMU's command line, vsock, or the agent's wire protocol. The shim's `start` and `delete` commands live in
// runtime/manager.
package task
