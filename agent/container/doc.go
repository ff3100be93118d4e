// Package container is the guest side of the container API
// (proto/agent/v1/container.proto): it builds containers with runc's
// libcontainer from the OCI spec the host sends, runs their init and exec
// processes through an explicit state machine, wires their stdio to the
// connections the stdio hub parked, and reports exits and OOM kills as
// events.
//
// It owns the containers' life in the guest: spec adaptation (root under the
// shared directory, no network namespace, no hooks), process states, exit
// statuses, cgroup v2 figures. It must not know how the guest booted, how the
// host reaches it, or how the shared directory got there; orphan reaping is
// someone else's and is coordinated through the ChildReaper it is given.
package container
