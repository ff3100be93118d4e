// Package image builds Kiln's guest boot assets: it installs the guest kernel
// that kernel/build.sh builds (Debian's linux-source-6.1 with everything built
// in, so no module goes into the guest) with its release, and writes a
// reproducible newc initramfs whose /init is the agent (or any other init,
// such as the benchmark's floor init in ./floorinit).
//
// It owns the archive layout the guest sees at boot (/init, /dev/console and
// the empty mount points). It must not know what the agent does with them
// beyond that layout, nor anything about QEMU, the shim or the host runtime.
package image
