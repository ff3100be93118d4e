// Package task is Kiln's containerd task service (task API v3): a thin layer that turns containerd's requests
// for one shim (one group of containers) into calls on one pod (runtime/pod) and its registry of containers and
// processes (runtime/container), maps their errors to containerd's (toGRPC), publishes containerd's task
// events, and opens containerd's fifos or log URIs for each process's stdio.
//
// It holds no process state of its own and knows nothing of QEMU, the share, vsock, or the agent's wire
// protocol. The shim's `start` and `delete` commands live in runtime/manager.
package task
