package config

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// Guest asset file names inside a share directory.
const (
	KernelFile = "vmlinuz"
	InitrdFile = "initrd.img"
)

// AssetDirs lists the share directories searched for guest assets, in order: next to the running binary
// (`<bin>/../share/kiln`, which covers both `_output/` and an install prefix), then /usr/local and /usr.
func AssetDirs() []string {
	var dirs []string
	if exe, err := os.Executable(); err == nil {
		if resolved, err := filepath.EvalSymlinks(exe); err == nil {
			exe = resolved
		}
		dirs = append(dirs, filepath.Join(filepath.Dir(exe), "..", "share", "kiln"))
	}
	return append(dirs, "/usr/local/share/kiln", "/usr/share/kiln")
}

// Assets are the guest kernel and initramfs to boot.
type Assets struct {
	Kernel string
	Initrd string
	// AgentImage is the agent image (`make image`'s agent.img: the agent's binary on ext2, which template guests
	// map from virtio-pmem), when there is one beside Initrd; "" otherwise.
	AgentImage string
}

// AgentImageFile is the agent image's file name, beside the initramfs.
const AgentImageFile = "agent.img"

// withAgentImage is a with the agent image beside its initramfs, when that file exists.
func (a Assets) withAgentImage() Assets {
	img := filepath.Join(filepath.Dir(a.Initrd), AgentImageFile)
	if st, err := os.Stat(img); err == nil && st.Mode().IsRegular() {
		a.AgentImage = img
	}
	return a
}

// ResolveAssets returns the configured assets, or the first share directory that holds both files, with the agent
// image when one is beside the initramfs; either way both files existed when it returned (paths Load's Validate
// has already found are not looked at again). The error lists every place looked at and how to produce the files.
func (c Config) ResolveAssets() (Assets, error) {
	if c.Hypervisor.Kernel != "" || c.Hypervisor.Initrd != "" {
		a := Assets{Kernel: c.Hypervisor.Kernel, Initrd: c.Hypervisor.Initrd}
		if a.Kernel == "" || a.Initrd == "" {
			return Assets{}, fmt.Errorf("hypervisor.kernel and hypervisor.initrd must be set together (kernel %q, initrd %q)", a.Kernel, a.Initrd)
		}
		if a == c.validatedAssets {
			return a.withAgentImage(), nil
		}
		for _, p := range []string{a.Kernel, a.Initrd} {
			if _, err := os.Stat(p); err != nil {
				return Assets{}, fmt.Errorf("guest asset %s: %w (run `make image`, or fix hypervisor.kernel/initrd)", p, err)
			}
		}
		return a.withAgentImage(), nil
	}
	var looked []string
	for _, dir := range AssetDirs() {
		dir = filepath.Clean(dir)
		a := Assets{Kernel: filepath.Join(dir, KernelFile), Initrd: filepath.Join(dir, InitrdFile)}
		_, kerr := os.Stat(a.Kernel)
		_, ierr := os.Stat(a.Initrd)
		if kerr == nil && ierr == nil {
			return a.withAgentImage(), nil
		}
		looked = append(looked, a.Kernel)
	}
	return Assets{}, fmt.Errorf("guest kernel not found (looked for %s): run `make image` (and `make install`), or set hypervisor.kernel and hypervisor.initrd", strings.Join(looked, ", "))
}
