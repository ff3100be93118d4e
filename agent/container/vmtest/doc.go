// Package vmtest checks the container API end to end: it boots the real
// kiln-agent in a QEMU guest with a busybox rootfs shared over virtio-fs and
// drives containers through the API and the stdio port. Its tests need root
// and QEMU and are skipped in -short mode.
package vmtest
