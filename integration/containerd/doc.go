// Package containerd is the test harness for Kiln under a real containerd: it builds the pinned containerd, ctr,
// containerd-shim-runc-v2 and runc into a tools directory (once; later calls reuse them), runs a private
// containerd whose root, state, sockets and configuration live in one temporary directory (it never talks to a
// system containerd), drives it with ctr, and builds a busybox OCI image from Debian's busybox-static for
// `ctr images import` (no registry is reachable). The containerd integration tests, `make demo` and the bench
// use it. It knows nothing of Kiln's internals: Kiln is a shim binary found on the private containerd's PATH.
package containerd
