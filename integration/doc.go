// Package integration holds end-to-end tests that boot real QEMU guests with the real guest kernel and agent
// (and, later, drive real containerd). They need root, QEMU and `make image`; `go test -short` skips them.
package integration
