// Package image builds Kiln's guest boot assets: it fetches the Debian cloud
// kernel package (resolved through apt at build time, never a pinned ABI),
// extracts vmlinuz and the requested kernel modules, orders the modules by
// their ELF .modinfo dependencies, and writes a reproducible newc initramfs
// whose /init is the agent (or any other init, such as the benchmark's floor
// init in ./floorinit).
//
// It owns the archive layout the guest sees at boot (/init, /lib/modules/*.ko,
// /etc/kiln/modules, /dev/console and the empty mount points). It must not
// know what the agent does with them beyond that layout, nor anything about
// QEMU, the shim or the host runtime.
package image
